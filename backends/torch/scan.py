"""Selective scan (the ``selective_ssm`` layer) for the torch backend.

Owns ``selective_scan`` (whole sequences, with gradients to every input
including the initial state) and ``selective_scan_step`` (one token, for
decoding).  Semantics are mamba_ssm's ``selective_scan_ref``::

    delta = softplus(delta + delta_bias)            # optional bias / softplus
    x_t   = Abar_t * x_{t-1} + Bbar_t * u_t         # per (batch, d, n)
    y_t   = <C_t, x_t> + D * u_t ;  y = y * silu(z)  # optional skip / gate

with ``(Abar_t, Bbar_t)`` the discretization of ``(A, B_t, delta_t)``: the
compiled program of the ``discretize`` pass (``seqc.discretization``; a
``DiscProgram``), or, given a method name (``"mamba"``: ZOH A, Euler B;
``"zoh"``; ``"bilinear"``), the program derived for that method.  Nothing
here writes a discretization out by hand.

Structure: prologue (bias, softplus; discretization) -> the generic diagonal
recurrence ``x_t = a_t x_{t-1} + b_t`` -> epilogue (contraction with C, D
skip, gate).  Memory: the ``(batch, L, D, N)`` states are never kept for
backward.  The recurrence is a custom ``autograd.Function`` that saves only
the state before every ``chunk``-th step; backward recomputes one chunk of
states at a time and runs the adjoint ``h_t = a_{t+1} * h_{t+1} + C_t * dy_t``
backwards through it.  Two engines implement that core:

* ``_NumbaEngine`` (CPU tensors, numba importable, ``SEQC_NO_NUMBA`` unset or
  "0"): the two kernels generated from the program by ``cpu_kernels``,
  parallel over (batch, block of channels), vectorised over the channels of
  a block, with the printed derivative program in the adjoint.
* ``_TorchEngine`` (everything else, any device): chunks vectorised with a
  Hillis-Steele scan, sequential across chunks; the adjoint is the same scan
  run backwards in time, the (elementwise) discretization differentiated by
  autograd.

The numba kernels are also specialised by the fusion flags (``kernel_flags``:
delta bias, softplus, ``D`` skip, silu gate): they read the raw delta and z
and write the final y, and their backward gives every input's gradient
(the custom op ``seqc::selective_scan_fused``, so torch.compile keeps it in its
graph as one opaque call).  With the torch engine those pieces are torch ops around
the core, differentiated by autograd (O(batch*L*D) memory either way).
bf16/fp16 inputs are computed in float32 and returned in the input dtype.
"""
import math

import torch
import torch.nn.functional as F

from seqc import discretization
from seqc.errors import SeqcError

from . import cpu_kernels
from .base import compiler_disable
from .fused import FusedCore

DISCRETIZATIONS = ("mamba", "zoh", "bilinear")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_NUMBA_CHUNK = 64
_TORCH_CHUNK = 32


def kernel_flags(attrs: dict, region=None, gate: bool = False) -> dict:
    """The specialisation flags of the fused scan: the fusion region's where the
    compiler made one, else derived from the layer's attributes (the one place
    that does)."""
    flags = getattr(region, "flags", None)
    if flags:
        return dict(flags)
    return {"delta_bias": bool(attrs.get("delta_bias")), "delta_softplus": bool(attrs.get("delta_softplus", True)),
            "disc": attrs.get("disc", "mamba"), "d_skip": True, "gate": "silu" if gate else None}


def _resolve(disc):
    """A DiscProgram for ``disc`` (a program, or a method name: derived once, cached).
    A program passes straight through (torch.compile traces this); a name is derived
    outside dynamo's tracing (``_named``: dynamo must not trace into sympy)."""
    if isinstance(disc, str):
        return _named(disc)
    if getattr(disc, "structure", None) != "diag":
        raise SeqcError(f"the selective scan needs a diagonal discretization program, got {disc!r}")
    return disc


@compiler_disable
def _named(disc: str):
    if disc not in DISCRETIZATIONS:
        raise SeqcError(f"unknown discretization {disc!r} for the selective scan "
                        f"(expected one of {', '.join(DISCRETIZATIONS)})")
    return discretization.program("diag", disc)


@compiler_disable
def _torch_function(program):
    return program.compile("torch")


# --------------------------------------------------------------------------- #
# elementwise pieces shared by the step function and the torch engine
# --------------------------------------------------------------------------- #
def _prep_delta(delta, delta_bias, delta_softplus):
    if delta_bias is not None:
        delta = delta + delta_bias
    return F.softplus(delta) if delta_softplus else delta


def _discretize(delta, A, B, fn):
    """delta (..., D), A (D, N), B (..., N) -> (dA, dB), each (..., D, N), by the
    compiled diagonal discretization ``fn`` (B_t broadcast over the channels)."""
    return fn(A, B.unsqueeze(-2), delta.unsqueeze(-1))


def _skip_and_gate(y, u, D, z):
    if D is not None:
        y = y + u * D
    if z is not None:
        y = y * F.silu(z)
    return y


def selective_scan_step(u_t, delta_t, A, B_t, C_t, D=None, z_t=None, delta_bias=None,
                        delta_softplus=True, state=None, disc="mamba", discretize_fn=None):
    """One recurrence step for token-by-token decoding.

    u_t, delta_t, z_t: (batch, D); B_t, C_t: (batch, N); state: (batch, D, N)
    or None (zeros); ``discretize_fn``: the compiled torch discretization (else
    the one of ``disc``).  Returns ``(y_t (batch, D), new_state (batch, D, N))``.
    """
    delta_t = _prep_delta(delta_t, delta_bias, delta_softplus)
    if state is None:
        state = u_t.new_zeros(u_t.shape + (A.shape[-1],))
    fn = discretize_fn or _torch_function(_resolve(disc))
    dA, dB = _discretize(delta_t, A, B_t, fn)
    state = dA * state + dB * u_t.unsqueeze(-1)
    y = (state * C_t.unsqueeze(-2)).sum(-1)
    return _skip_and_gate(y, u_t, D, z_t), state


# --------------------------------------------------------------------------- #
# torch engine: chunks vectorised with a Hillis-Steele scan, analytic adjoint
# --------------------------------------------------------------------------- #
def _linear_scan(a, b, x0):
    """x_t = a_t * x_{t-1} + b_t along dim 1 from x0, inclusive (Hillis-Steele).
    a, b: (batch, T, ...); x0: (batch, ...).  Returns all x_t."""
    T, s = a.shape[1], 1
    a, b = a.clone(), b.clone()
    while s < T:
        b[:, s:] += a[:, s:] * b[:, :-s]  # the product is formed before b is written
        a[:, s:] = a[:, s:] * a[:, :-s]
        s *= 2
    return torch.addcmul(b, a, x0.unsqueeze(1))


class _TorchEngine:
    """Pure-torch core: works on any device and for every discretization.
    Forward keeps the state before each chunk; backward recomputes a chunk's
    states, runs the adjoint h_t = dA_{t+1} h_{t+1} + C_t dy_t as a reversed
    scan, and differentiates only the (elementwise) discretization by autograd."""

    def __init__(self, chunk, program):
        self.chunk, self.fn = chunk, _torch_function(program)

    def _spans(self, L):
        return [(t, min(t + self.chunk, L)) for t in range(0, L, self.chunk)]

    def _coefficients(self, u, delta, A, B):
        """(dA, dB * u) of x_t = dA_t x_{t-1} + dB_t u_t, each (b, T, D, N)."""
        a, dB = _discretize(delta, A, B, self.fn)
        return a, dB * u.unsqueeze(-1)

    def forward(self, u, delta, A, B, C, x0):
        ys, ckpts, x = [], [], x0
        for t0, t1 in self._spans(u.shape[1]):
            ckpts.append(x)
            xs = _linear_scan(*self._coefficients(u[:, t0:t1], delta[:, t0:t1], A, B[:, t0:t1]), x)
            ys.append(torch.einsum("btdn,btn->btd", xs, C[:, t0:t1]))
            x = xs[:, -1].clone()  # a view would keep the whole chunk alive
        return torch.cat(ys, 1), x, torch.stack(ckpts)

    def backward(self, u, delta, A, B, C, ckpts, gy, gx):
        parts, dA, h = [], torch.zeros_like(A), gx
        spans = self._spans(u.shape[1])
        for c in reversed(range(len(spans))):
            t0, t1 = spans[c]
            leaves = [t.detach().requires_grad_() for t in (u[:, t0:t1], delta[:, t0:t1], A, B[:, t0:t1])]
            with torch.enable_grad():
                a, bu = self._coefficients(*leaves)
            xs = _linear_scan(a.detach(), bu.detach(), ckpts[c])
            g = gy[:, t0:t1]
            hs = self._adjoint(a.detach(), C[:, t0:t1, None, :] * g.unsqueeze(-1), h)
            x_prev = torch.cat([ckpts[c].unsqueeze(1), xs[:, :-1]], 1)
            du, ddelta, dA_c, dB = torch.autograd.grad((a, bu), leaves, (hs * x_prev, hs))
            h = a[:, 0].detach() * hs[:, 0]
            dA += dA_c
            parts.append((du, ddelta, dB, torch.einsum("btdn,btd->btn", xs, g)))
        du, ddelta, dB, dC = (torch.cat(p[::-1], 1) for p in zip(*parts))
        return du, ddelta, dA, dB, dC, h

    @staticmethod
    def _adjoint(a, c_gy, h_next):
        """h_t = a_{t+1} h_{t+1} + c_gy_t within a chunk, h_next = dL/dx at its end."""
        coef = torch.cat([a[:, 1:], torch.ones_like(a[:, :1])], 1).flip(1)
        return _linear_scan(coef, c_gy.flip(1), h_next).flip(1)


# --------------------------------------------------------------------------- #
# numba engine: generated kernels (backends/torch/cpu_kernels.py)
#
# Channels are split into nw blocks of W (``_block_width``) and the kernels see
# "blocked" views: u, delta (b, L, nw, W), A (nw, N, W), states (b, nw, N, W).
# A job is (batch, block); its innermost loop runs over the W channels with
# plain integer indexing, so LLVM vectorises it without reordering any sum
# except the cross-channel ones of dB and dC (hence ``reassoc`` on the
# backward kernel only).
# --------------------------------------------------------------------------- #
_W_MAX, _W_MIN = 64, 16
_exp = cpu_kernels._exp


def _block_width(batch, d, threads):
    """Channels per job: the widest power of two up to 64 dividing d that
    still leaves two jobs per thread (but never below 16 for that)."""
    w = math.gcd(d, _W_MAX)
    while w > _W_MIN and batch * (d // w) < 2 * threads:
        w //= 2
    return w


def _numba_kernels(program=None):
    """The generated (fwd, bwd) kernels of a diag DiscProgram (default: mamba's), or None."""
    if program is None:
        program = _resolve("mamba")
    return cpu_kernels.kernels(program)


class _NumbaEngine:
    """CPU core: the generated forward and backward kernels, called on the
    blocked layouts described above.  The kernels are specialised by the
    region's flags: they read the raw delta (bias, softplus inside), the gate
    z and D, and write the final y; backward returns the gradients of all of
    them (``_fused_forward``)."""

    fused = True

    def __init__(self, chunk, kernels):
        self.chunk = chunk
        self.fwd, self.bwd = kernels.fwd, kernels.bwd

    @staticmethod
    def _blocked(u, A):
        """Blocked views of (b, L, D) tensors, A (D, N) blocked, a function giving a fresh
        blocked copy of a (b, D, N) state (the kernels write it), and one blocking a (D,)
        vector (zeros for None: a flag that is off never reads it)."""
        b, L, d = u.shape
        W = _block_width(b, d, torch.get_num_threads())
        seq = lambda t: t.detach().contiguous().view(b, L, d // W, W).numpy()  # noqa: E731
        blk = A.detach().t().reshape(A.shape[1], d // W, W).transpose(0, 1).contiguous()
        state_in = lambda s: s.detach().to(u.dtype).transpose(1, 2).reshape(  # noqa: E731
            b, A.shape[1], d // W, W).transpose(1, 2).clone(memory_format=torch.contiguous_format)
        vec = lambda v: (u.new_zeros(d) if v is None else v.detach().contiguous()).view(  # noqa: E731
            d // W, W).numpy()
        return seq, blk.numpy(), state_in, vec

    @staticmethod
    def _state_out(s):
        """(b, nw, N, W) -> (b, D, N)."""
        b, nw, N, W = s.shape
        return s.transpose(1, 2).reshape(b, N, nw * W).transpose(1, 2)

    def forward(self, u, delta, A, B, C, D, z, bias, x0):
        """u, delta, B, C, z contiguous (``selective_scan`` makes them so before the custom op)."""
        seq, Ablk, state_in, vec = self._blocked(u, A)
        u_b = seq(u)
        b, L, nw, W = u_b.shape
        y = u.new_empty(b, L, nw * W)
        x = state_in(x0)
        ckpt = u.new_empty((b, -(-L // self.chunk)) + x.shape[1:])
        self.fwd(u_b, seq(delta), Ablk, B.numpy(), C.numpy(), vec(D), u_b if z is None else seq(z), vec(bias),
                 self.chunk, y.view(b, L, nw, W).numpy(), ckpt.numpy(), x.numpy())
        return y, self._state_out(x), ckpt

    def backward(self, u, delta, A, B, C, D, z, bias, ckpt, gy, gx):
        """u, delta, B, C, z as forward had them (contiguous)."""
        seq, Ablk, state_in, vec = self._blocked(u, A)
        u_b = seq(u)
        b, L, nw, W = u_b.shape
        N = A.shape[1]
        h = state_in(gx)
        du, ddt, dA = u.new_empty(b, L, nw * W), u.new_empty(b, L, nw * W), torch.zeros_like(h)
        dB, dC = u.new_empty(b, nw, L, N), u.new_empty(b, nw, L, N)
        dD, dbias = u.new_zeros(b, nw, W), u.new_zeros(b, nw, W)
        dz = u.new_empty(b, L, nw * W) if z is not None else u.new_empty(1, 1, nw, W)
        xs = u.new_empty(b * nw, self.chunk + 1, N, W)
        als = u.new_empty(b * nw, self.chunk, N, W)
        self.bwd(u_b, seq(delta), Ablk, B.numpy(), C.numpy(), vec(D), u_b if z is None else seq(z), vec(bias),
                 ckpt.numpy(), seq(gy), self.chunk,
                 h.numpy(), xs.numpy(), als.numpy(), du.view(b, L, nw, W).numpy(),
                 ddt.view(b, L, nw, W).numpy(), dA.numpy(), dB.numpy(), dC.numpy(), dD.numpy(),
                 dbias.numpy(), dz.view(-1, dz.shape[1], nw, W).numpy())
        return (du, ddt, self._state_out(dA).sum(0), dB.sum(1), dC.sum(1),
                None if D is None else dD.sum(0).reshape(-1), None if z is None else dz,
                None if bias is None else dbias.sum(0).reshape(-1), self._state_out(h))


# --------------------------------------------------------------------------- #
# the autograd core and the public entry point
# --------------------------------------------------------------------------- #
class _ScanCore(torch.autograd.Function):
    """(u, delta, A, B, C, x0) -> (y without skip/gate, final state), O(L/chunk) states saved
    (the torch engine: prologue and epilogue are torch ops around it)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, x0, engine):
        y, xL, ckpt = engine.forward(u, delta, A, B, C, x0)
        ctx.engine = engine
        ctx.save_for_backward(u, delta, A, B, C, ckpt)
        return y, xL

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gx):
        u, delta, A, B, C, ckpt = ctx.saved_tensors
        gy = torch.zeros_like(u) if gy is None else gy
        gx = u.new_zeros(u.shape[0], u.shape[2], A.shape[1]) if gx is None else gx
        grads = ctx.engine.backward(u, delta, A, B, C, ckpt, gy, gx)
        return grads + (None,)


# The fused numba path is a ``FusedCore``: under torch.compile the custom op
# ``seqc::selective_scan_fused`` and its backward, with fake implementations giving the output
# shapes from the inputs' (symbolic) shapes, so dynamo puts one opaque call in the graph, no
# graph break, and a new batch or length reuses the compiled graph.  The discretization
# program travels as a string key (``program_key``) registered once, outside tracing.
_PROGRAMS: dict = {}        # key -> DiscProgram


def program_key(program) -> str:
    """The key under which the custom op finds ``program`` (a diag DiscProgram); registered on
    first use.  Layers register theirs when they are configured, so torch.compile only reads
    an attribute here."""
    key = getattr(program, "_seqc_scan_key", None)
    return key if key is not None else _register(program)


@compiler_disable
def _register(program) -> str:
    key = f"{program.method}-{program.digest}"
    _PROGRAMS.setdefault(key, program)
    object.__setattr__(program, "_seqc_scan_key", key)   # a cache on a frozen dataclass: not a field
    return key


def _flags(bias: bool, softplus: bool, d_skip: bool, gate: bool) -> dict:
    return {"delta_bias": bias, "delta_softplus": softplus, "d_skip": d_skip, "gate": "silu" if gate else None}


def _fused_available(key: str, device: str, bias: bool, softplus: bool, d_skip: bool, gate: bool) -> bool:
    """Whether the fused numba kernels run this call (decided once per traced graph under
    torch.compile: the environment and numba are read when compiling)."""
    return isinstance(_pick_engine_for(device, _PROGRAMS[key], None, _flags(bias, softplus, d_skip, gate)),
                      _NumbaEngine)


# what torch._dynamo.assume_constant_result does, without importing dynamo at import time
_fused_available._dynamo_marked_constant = True


def _fused_engine(key, bias, softplus, d_skip, gate, chunk):
    kernels = cpu_kernels.kernels(_PROGRAMS[key], _flags(bias, softplus, d_skip, gate))
    return _NumbaEngine(chunk or _NUMBA_CHUNK, kernels)


def _fused_forward(u, delta, A, B, C, D, z, bias, x0, key, softplus, chunk):
    """((y, final state), (checkpoints flattened to (batch, chunks, D * N),))."""
    engine = _fused_engine(key, bias is not None, softplus, D is not None, z is not None, chunk)
    y, last, ckpt = engine.forward(u, delta, A, B, C, D, z, bias, x0)
    return (y, last), (ckpt.view(ckpt.shape[0], ckpt.shape[1], -1),)


def _fused_backward(inputs, saved, grads, options):
    """Gradients of (u, delta, A, B, C, D, z, bias, x0); None for an absent input."""
    u, delta, A, B, C, D, z, bias, _x0 = inputs
    gy, gx = grads
    key, softplus, chunk = options
    engine = _fused_engine(key, bias is not None, softplus, D is not None, z is not None, chunk)
    b, L, d = u.shape
    W = _block_width(b, d, torch.get_num_threads())
    ckpt = saved[0].view(b, saved[0].shape[1], d // W, A.shape[1], W)
    return engine.backward(u, delta, A, B, C, D, z, bias, ckpt, gy, gx)


def _fused_fake(u, delta, A, B, C, D, z, bias, x0, key, softplus, chunk):
    b, L, d = u.shape
    count = (L + (chunk or _NUMBA_CHUNK) - 1) // (chunk or _NUMBA_CHUNK)
    return [u.new_empty(b, L, d), u.new_empty(b, d, A.shape[1]), u.new_empty(b, count, d * A.shape[1])]


FUSED_SCAN = FusedCore(
    "selective_scan_fused", "Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? bias, "
    "Tensor x0, str key, bool softplus, int chunk", _fused_forward, _fused_backward, _fused_fake, n_outputs=2)


def _pick_engine(u, disc, chunk, flags=None):
    """The numba engine where it applies and is wanted (CPU, a program with a kernel form),
    else the torch one.  ``disc``: a method name or a DiscProgram; ``flags``: the fused
    kernel's specialisation (``cpu_kernels.normalise_flags``)."""
    return _pick_engine_for(u.device.type, _resolve(disc), chunk, flags)


def _pick_engine_for(device, program, chunk, flags):
    use_numba = device == "cpu" and cpu_kernels.wanted()
    kernels = cpu_kernels.kernels(program, flags) if use_numba else None
    if kernels is not None:
        return _NumbaEngine(chunk or _NUMBA_CHUNK, kernels)
    return _TorchEngine(chunk or _TORCH_CHUNK, program)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                   state=None, return_state=False, disc="mamba", chunk=None):
    """u, delta: (batch, L, D); A: (D, N) (already -exp(A_log)); B, C: (batch, L, N); D: (D,);
    z: (batch, L, D) optional gate; delta_bias: (D,) optional; state: (batch, D, N) initial state or None.
    Returns y (batch, L, D) [and final state (batch, D, N) if return_state].

    ``disc`` is a DiscProgram or a method name ("mamba": Euler B, "zoh",
    "bilinear"); ``chunk`` is the checkpoint interval (None: engine default).
    The numba engine runs bias, softplus, skip and gate inside its kernels
    (specialised by which of them are present); the torch engine as torch ops.
    Gradients reach every tensor argument.
    """
    disc = _resolve(disc)
    out_dtype = u.dtype
    work = torch.float32 if out_dtype in _LOW_PRECISION else out_dtype
    cast = lambda t: None if t is None else t.to(work)  # noqa: E731
    u, delta, A, B, C, D, z, delta_bias, state = map(
        cast, (u, delta, A, B, C, D, z, delta_bias, state))
    if state is None:
        state = u.new_zeros(u.shape[0], u.shape[2], A.shape[-1])
    key = program_key(disc)
    if _fused_available(key, u.device.type, delta_bias is not None, bool(delta_softplus), D is not None,
                        z is not None):
        dense = lambda t: None if t is None else t.contiguous()  # noqa: E731  (the kernels read them so)
        y, last = FUSED_SCAN(*map(dense, (u, delta, A, B, C, D, z, delta_bias, state)), key,
                             bool(delta_softplus), int(chunk or 0))
    else:
        flags = _flags(delta_bias is not None, bool(delta_softplus), D is not None, z is not None)
        engine = _pick_engine_for(u.device.type, disc, chunk, flags)
        delta = _prep_delta(delta, delta_bias, delta_softplus)
        y, last = _ScanCore.apply(u, delta, A, B, C, state, engine)
        y = _skip_and_gate(y, u, D, z)
    y = y.to(out_dtype)
    return (y, last.to(out_dtype)) if return_state else y


# --------------------------------------------------------------------------- #
# the time-invariant complex diagonal recurrence (ssm kinds diag = S4D and s5)
#
#   x_t = a * x_{t-1} + Bbar * u_t,   w_t = sum_s C_s * x_t,s
#
# a, Bbar, C constant complex (H, S) (computed once per call by the layer from its
# parameters through the compiled discretization, so autograd takes their gradients
# on to log_A_real, A_imag, log_dt, ...), u real (S4D) or complex (S5's projected
# input), w real part only (S4D reads 2 Re w) or complex.  Complex numbers cross the
# autograd boundary as (re, im) pairs of real tensors; gradients of a complex z are
# dL/dRe z + i dL/dIm z.  The same chunk-checkpoint scheme as the selective core:
# O(L / chunk) states saved, each chunk recomputed in backward, where the adjoint
# G_t = conj(a) G_{t+1} + conj(C) dL/dw_t runs backwards.
# --------------------------------------------------------------------------- #
def _complex(re, im):
    return torch.complex(re, im) if im is not None else re


def _const_scan(a, b, x0, apow):
    """x_t = a x_{t-1} + b_t along dim 1 from x0 for a constant a (H, S): Hillis-Steele over
    b (batch, T, H, S), with a^s a constant per level; ``apow`` (T, H, S) = a^(t+1)."""
    T, s, p = b.shape[1], 1, a
    b = b.clone()
    while s < T:
        b[:, s:] += p * b[:, :-s]   # the product is formed before b is written
        p = p * p
        s *= 2
    return b + apow[:T] * x0.unsqueeze(1)


def _pow_table(a, n):
    """(n, *a.shape): a^(t+1) for t < n, by doubling."""
    out, p = a.unsqueeze(0), a
    while out.shape[0] < n:
        out = torch.cat([out, p * out], 0)    # p = a^len(out)
        p = p * p
    return out[:n]


class _LTITorchEngine:
    """Pure-torch LTI core (any device, ``SEQC_NO_NUMBA``): chunks scanned with Hillis-Steele
    (a constant, so each level multiplies by one power a^s), sequential across chunks."""

    fused = False

    def __init__(self, chunk):
        self.chunk = chunk

    def _spans(self, L):
        return [(t, min(t + self.chunk, L)) for t in range(0, L, self.chunk)]

    @staticmethod
    def _unpack(ur, ui, ar, ai, br, bi, cr, ci):
        return _complex(ur, ui), torch.complex(ar, ai), torch.complex(br, bi), torch.complex(cr, ci)

    def forward(self, ur, ui, ar, ai, br, bi, cr, ci, x0r, x0i, lens, complex_out):
        u, a, Bbar, C = self._unpack(ur, ui, ar, ai, br, bi, cr, ci)
        L = u.shape[1]
        apow = _pow_table(a, min(self.chunk, L))
        x = torch.complex(x0r, x0i)
        final = x.clone() if lens is not None else None
        ws, ckpts = [], []
        for t0, t1 in self._spans(L):
            ckpts.append(x)
            xs = _const_scan(a, Bbar * u[:, t0:t1, :, None], x, apow)
            ws.append(torch.einsum("bths,hs->bth", xs, C))
            if lens is not None:   # the state after lens[b] steps, if it falls in this chunk
                inside = (lens > t0) & (lens <= t1)
                pick = xs[torch.arange(xs.shape[0], device=xs.device), (lens - 1 - t0).clamp(0, t1 - t0 - 1)]
                final = torch.where(inside[:, None, None], pick, final)
            x = xs[:, -1].clone()  # a view would keep the whole chunk alive
        w = torch.cat(ws, 1)
        xl = x if lens is None else final
        ys = (w.real, w.imag) if complex_out else (w.real,)
        return ys, (xl.real, xl.imag), torch.stack(ckpts)

    def backward(self, ur, ui, ar, ai, br, bi, cr, ci, lens, ckpts, gys, gx):
        u, a, Bbar, C = self._unpack(ur, ui, ar, ai, br, bi, cr, ci)
        batch, L = u.shape[:2]
        gw = _complex(*gys) if len(gys) == 2 else gys[0]
        apow = _pow_table(a, min(self.chunk, L))
        ac = a.conj()
        acpow = apow.conj()
        gxc = torch.complex(*gx)
        rows = torch.arange(batch, device=u.device)
        G = torch.zeros_like(gxc)              # dL/dx at the start of the following chunk
        da, dB, dC = torch.zeros_like(a), torch.zeros_like(a), torch.zeros_like(a)
        dus = []
        for t0, t1 in reversed(self._spans(L)):
            xs = _const_scan(a, Bbar * u[:, t0:t1, :, None], ckpts[t0 // self.chunk], apow)
            g = gw[:, t0:t1, :, None] * C.conj()
            if lens is None:
                if t1 == L:
                    g[:, -1] += gxc
            else:
                inside = (lens > t0) & (lens <= t1)
                at = (lens - 1 - t0).clamp(0, t1 - t0 - 1)
                g[rows, at] += torch.where(inside[:, None, None], gxc, torch.zeros_like(gxc))
            Gs = _const_scan(ac, g.flip(1), G, acpow).flip(1)   # G_t = conj(a) G_{t+1} + g_t
            x_prev = torch.cat([ckpts[t0 // self.chunk].unsqueeze(1), xs[:, :-1]], 1)
            da += torch.einsum("bths,bths->hs", Gs, x_prev.conj())
            dC += torch.einsum("bth,bths->hs", gw[:, t0:t1].to(xs.dtype), xs.conj())
            uc = u[:, t0:t1].to(Gs.dtype)
            dB += torch.einsum("bths,bth->hs", Gs, uc.conj())
            dus.append(torch.einsum("bths,hs->bth", Gs, Bbar.conj()))
            G = Gs[:, 0]
        dx0 = ac * G
        if lens is not None:
            dx0 = dx0 + torch.where((lens == 0)[:, None, None], gxc, torch.zeros_like(gxc))
        du = torch.cat(dus[::-1], 1)
        dui = du.imag if ui is not None else None
        return (du.real, dui, da.real, da.imag, dB.real, dB.imag, dC.real, dC.imag, dx0.real, dx0.imag)


class _LTINumbaEngine:
    """CPU LTI core: the generated kernels (``cpu_kernels.lti_kernels``) on channel-blocked
    layouts - u, w (b, L, nw, W), parameters (nw, S, W), states (b, nw, S, W) - parallel over
    (batch, block), vectorised over the W channels of a block."""

    def __init__(self, chunk, kernels):
        self.chunk = chunk
        self.fwd, self.bwd = kernels.fwd, kernels.bwd

    @staticmethod
    def _layout(ur, ar):
        b, L, h = ur.shape
        W = _block_width(b, h, torch.get_num_threads())
        nw, S = h // W, ar.shape[1]
        seq = lambda t: t.detach().contiguous().view(b, L, nw, W)          # noqa: E731
        par = lambda t: t.detach().t().reshape(S, nw, W).transpose(0, 1).contiguous()  # noqa: E731
        st_in = lambda t: t.detach().transpose(1, 2).reshape(b, S, nw, W).transpose(1, 2).clone(  # noqa: E731
            memory_format=torch.contiguous_format)                   # a copy: the kernels write states
        st_out = lambda t: t.transpose(1, 2).reshape(t.shape[0], S, h).transpose(1, 2)  # noqa: E731
        return (b, L, h, W, nw, S), seq, par, st_in, st_out

    @staticmethod
    def _lens(lens, b, L, device):
        if lens is None:
            return torch.full((b,), L, dtype=torch.int64)
        return lens.detach().to("cpu", torch.int64).contiguous()

    def forward(self, ur, ui, ar, ai, br, bi, cr, ci, x0r, x0i, lens, complex_out):
        (b, L, h, W, nw, S), seq, par, st_in, st_out = self._layout(ur, ar)
        n = lambda t: t.numpy()   # noqa: E731
        uru = seq(ur)
        uiu = seq(ui) if ui is not None else uru
        yr = ur.new_empty(b, L, nw, W)
        yi = ur.new_empty(b, L, nw, W) if complex_out else yr
        xr, xi = st_in(x0r), st_in(x0i)
        fr, fi = torch.empty_like(xr), torch.empty_like(xi)
        ckpt = ur.new_empty(b, -(-L // self.chunk), 2, nw, S, W)
        self.fwd(n(uru), n(uiu), *(n(par(t)) for t in (ar, ai, br, bi, cr, ci)), n(self._lens(lens, b, L, ur.device)),
                 self.chunk, n(yr), n(yi), n(ckpt), n(xr), n(xi), n(fr), n(fi))
        ys = (yr.view(b, L, h), yi.view(b, L, h)) if complex_out else (yr.view(b, L, h),)
        return ys, (st_out(fr), st_out(fi)), ckpt

    def backward(self, ur, ui, ar, ai, br, bi, cr, ci, lens, ckpt, gys, gx):
        (b, L, h, W, nw, S), seq, par, st_in, st_out = self._layout(ur, ar)
        n = lambda t: t.numpy()   # noqa: E731
        uru = seq(ur)
        uiu = seq(ui) if ui is not None else uru
        gyr = seq(gys[0])
        gyi = seq(gys[1]) if len(gys) == 2 else gyr
        hr, hi = ur.new_zeros(b, nw, S, W), ur.new_zeros(b, nw, S, W)
        xs = ur.new_empty(b * nw, self.chunk + 1, 2, S, W)
        dur = ur.new_empty(b, L, nw, W)
        dui = ur.new_empty(b, L, nw, W) if ui is not None else dur
        parts = [ur.new_zeros(b, nw, S, W) for _ in range(6)]
        self.bwd(n(uru), n(uiu), *(n(par(t)) for t in (ar, ai, br, bi, cr, ci)), n(self._lens(lens, b, L, ur.device)),
                 n(ckpt), n(gyr), n(gyi), n(st_in(gx[0])), n(st_in(gx[1])), self.chunk, n(hr), n(hi), n(xs),
                 n(dur), n(dui), *(n(p) for p in parts))
        grads = [st_out(p.sum(0, keepdim=True))[0] for p in parts]
        return (dur.view(b, L, h), dui.view(b, L, h) if ui is not None else None, *grads,
                st_out(hr), st_out(hi))


class _LTICore(torch.autograd.Function):
    """(u_re, u_im | None, a, Bbar, C as re/im pairs, x0 re/im, lengths) -> (w_re[, w_im], x_re, x_im),
    O(L / chunk) states saved; ``engine`` is an _LTINumbaEngine or an _LTITorchEngine."""

    @staticmethod
    def forward(ctx, ur, ui, ar, ai, br, bi, cr, ci, x0r, x0i, lens, engine, complex_out):
        ys, xl, ckpt = engine.forward(ur, ui, ar, ai, br, bi, cr, ci, x0r, x0i, lens, complex_out)
        ctx.engine, ctx.complex_in, ctx.complex_out = engine, ui is not None, complex_out
        ctx.save_for_backward(ur, ui, ar, ai, br, bi, cr, ci, lens, ckpt)
        return (*ys, *xl)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        ur, ui, ar, ai, br, bi, cr, ci, lens, ckpt = ctx.saved_tensors
        zero = lambda g, like: torch.zeros_like(like) if g is None else g.contiguous()   # noqa: E731
        ny = 2 if ctx.complex_out else 1
        state = torch.zeros(ur.shape[0], *ar.shape, dtype=ar.dtype, device=ar.device)
        gys = tuple(zero(g, ur) for g in grads[:ny])
        gx = tuple(zero(g, state) for g in grads[ny:])
        out = ctx.engine.backward(ur, ui, ar, ai, br, bi, cr, ci, lens, ckpt, gys, gx)
        return (*out, None, None, None)


def lti_scan(u, a, Bbar, C, state=None, lengths=None, complex_out=False, chunk=None):
    """The constant complex diagonal recurrence of the LTI ``ssm`` (S4D, S5):

        x_t = a * x_{t-1} + Bbar * u_t,   w_t = sum_s C_s * x_t,s

    u: (batch, L, H) real, or complex; a, Bbar, C: complex (H, S); state: complex (batch, H, S)
    initial state or None (zeros); lengths: (batch,) int64 or None - the final state returned is
    the one after lengths[b] steps (all L without).  Returns (w, final state): w (batch, L, H)
    real (Re w) or, with ``complex_out``, complex.  The numba kernels run on CPU (unless
    ``SEQC_NO_NUMBA``), the torch engine elsewhere; gradients reach u, a, Bbar, C and state."""
    batch, length, h = u.shape
    s = a.shape[-1]
    ar, ai = a.real, a.imag
    state = torch.zeros(batch, h, s, dtype=a.dtype, device=a.device) if state is None else state.to(a.dtype)
    ur, ui = (u.real, u.imag) if u.is_complex() else (u, None)
    if length == 0:
        w = u.new_zeros(batch, 0, h, dtype=a.dtype if complex_out else ar.dtype)
        return w, state
    use_numba = u.device.type == "cpu" and cpu_kernels.wanted()
    kernels = cpu_kernels.lti_kernels(ui is not None, complex_out) if use_numba else None
    if kernels is not None:
        engine = _LTINumbaEngine(chunk or _NUMBA_CHUNK, kernels)
    else:
        engine = _LTITorchEngine(chunk or max(_TORCH_CHUNK, math.isqrt(length)))
    out = _LTICore.apply(ur, ui, ar, ai, Bbar.real, Bbar.imag, C.real, C.imag, state.real, state.imag,
                         lengths, engine, complex_out)
    w = torch.complex(out[0], out[1]) if complex_out else out[0]
    return w, torch.complex(out[-2], out[-1])
