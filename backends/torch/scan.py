"""Selective scan (the ``selective_ssm`` layer) for the torch backend.

Owns ``selective_scan`` (whole sequences, with gradients to every input
including the initial state) and ``selective_scan_step`` (one token, for
decoding).  Semantics are mamba_ssm's ``selective_scan_ref``::

    delta = softplus(delta + delta_bias)            # optional bias / softplus
    x_t   = exp(delta_t * A) * x_{t-1} + dB_t * u_t # per (batch, d, n)
    y_t   = <C_t, x_t> + D * u_t ;  y = y * silu(z)  # optional skip / gate

with ``dB_t = delta_t * B_t`` (``disc="mamba"``) or
``dB_t = expm1(delta_t * A) / A * B_t`` (``disc="zoh"``).

Memory: the ``(batch, L, D, N)`` states are never kept for backward.  The
core recurrence is a custom ``autograd.Function`` that saves only the state
before every ``chunk``-th step; backward recomputes one chunk of states at a
time and runs the adjoint ``h_t = dA_{t+1} * h_{t+1} + C_t * dy_t`` backwards
through it.  Two engines implement that core:

* ``_NumbaEngine`` (CPU tensors, ``disc="mamba"``, numba importable,
  ``SEQC_NO_NUMBA`` unset or "0"): two fused JIT kernels, parallel over
  (batch, block of channels), vectorised over the channels of a block, with
  the adjoint written out by hand.
* ``_TorchEngine`` (everything else, any device): chunks vectorised with a
  Hillis-Steele scan, sequential across chunks; the adjoint is the same scan
  run backwards in time.

Softplus, bias, the ``D`` skip and the gate are plain torch ops around the
core, so autograd handles them (they only need O(batch*L*D) memory).
bf16/fp16 inputs are computed in float32 and returned in the input dtype.
"""
import math
import os

import threading

import numpy as np
import torch
import torch.nn.functional as F

from seqc.errors import SeqcError

from .base import discretized

DISCRETIZATIONS = ("mamba", "zoh", "bilinear")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_NUMBA_CHUNK = 64
_TORCH_CHUNK = 32


# --------------------------------------------------------------------------- #
# elementwise pieces shared by the step function and the torch engine
# --------------------------------------------------------------------------- #
def _prep_delta(delta, delta_bias, delta_softplus):
    if delta_bias is not None:
        delta = delta + delta_bias
    return F.softplus(delta) if delta_softplus else delta


def _discretize(delta, A, B, disc):
    """delta (..., D), A (D, N), B (..., N) -> (dA, dB), each (..., D, N), by the
    sympy-derived diagonal discretization (seqc.discretization) with B = 1."""
    dA, gain = discretized("diag", disc)(A, 1.0, delta.unsqueeze(-1))
    return dA, gain * B.unsqueeze(-2)


def _skip_and_gate(y, u, D, z):
    if D is not None:
        y = y + u * D
    if z is not None:
        y = y * F.silu(z)
    return y


def selective_scan_step(u_t, delta_t, A, B_t, C_t, D=None, z_t=None, delta_bias=None,
                        delta_softplus=True, state=None, disc="mamba"):
    """One recurrence step for token-by-token decoding.

    u_t, delta_t, z_t: (batch, D); B_t, C_t: (batch, N); state: (batch, D, N)
    or None (zeros).  Returns ``(y_t (batch, D), new_state (batch, D, N))``.
    """
    delta_t = _prep_delta(delta_t, delta_bias, delta_softplus)
    if state is None:
        state = u_t.new_zeros(u_t.shape + (A.shape[-1],))
    dA, dB = _discretize(delta_t, A, B_t, disc)
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

    def __init__(self, chunk, disc):
        self.chunk, self.disc = chunk, disc

    def _spans(self, L):
        return [(t, min(t + self.chunk, L)) for t in range(0, L, self.chunk)]

    def _coefficients(self, u, delta, A, B):
        """(dA, dB * u) of x_t = dA_t x_{t-1} + dB_t u_t, each (b, T, D, N)."""
        a, dB = _discretize(delta, A, B, self.disc)
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
# numba engine: fused kernels, analytic adjoint
#
# Channels are split into nw blocks of W (``_block_width``) and the kernels see
# "blocked" views: u, delta (b, L, nw, W), A (nw, N, W), states (b, nw, N, W).
# A job is (batch, block); its innermost loop runs over the W channels with
# plain integer indexing, so LLVM vectorises it without reordering any sum
# except the cross-channel ones of dB and dC (hence ``reassoc`` on the
# backward kernel only).  exp() is a vectorisable polynomial (libm's exp would
# keep every loop scalar), compiled without fast-math so its range reduction
# stays exact.
# --------------------------------------------------------------------------- #
_W_MAX, _W_MIN = 64, 16


def _block_width(batch, d, threads):
    """Channels per job: the widest power of two up to 64 dividing d that
    still leaves two jobs per thread (but never below 16 for that)."""
    w = math.gcd(d, _W_MAX)
    while w > _W_MIN and batch * (d // w) < 2 * threads:
        w //= 2
    return w


def _exp(x):
    """exp; inside the kernels, the numba overload registered by ``_numba_kernels``."""
    return math.exp(x)


def _fwd_kernel(u, dt, A, B, C, chunk, y, ckpt, x):  # pragma: no cover - JIT
    """u, dt, y: (b, L, nw, W); A: (nw, N, W); B, C: (b, L, N); x (b, nw, N, W)
    holds the initial state on entry and the final state on exit; ckpt
    (b, nchunks, nw, N, W) receives the state before each chunk."""
    nb, L, nw, W = u.shape
    N = A.shape[1]
    for job in _prange(nb * nw):
        b, k = job // nw, job % nw
        xk, Ak = x[b, k], A[k]
        for t in range(L):
            if t % chunk == 0:
                ckpt[b, t // chunk, k] = xk
            ut, dtt, yt = u[b, t, k], dt[b, t, k], y[b, t, k]
            yt[:] = 0
            for n in range(N):
                bn, cn, xn, An = B[b, t, n], C[b, t, n], xk[n], Ak[n]
                for j in range(W):
                    v = _exp(dtt[j] * An[j]) * xn[j] + dtt[j] * ut[j] * bn
                    xn[j] = v
                    yt[j] += cn * v


def _bwd_kernel(u, dt, A, B, C, ckpt, gy, chunk, h, xs, als,
                du, ddt, dA, dB, dC):  # pragma: no cover - JIT
    """Adjoint of ``_fwd_kernel`` (same layouts).  h (b, nw, N, W) enters as the
    final-state gradient and leaves as the initial-state gradient; dA
    (b, nw, N, W) starts at zero; job j owns workspaces xs[j] (chunk+1, N, W)
    and als[j] (chunk, N, W) and writes its block's share of dB and dC into
    dB[b, k], dC[b, k] (L, N)."""
    nb, L, nw, W = u.shape
    N = A.shape[1]
    for job in _prange(nb * nw):
        b, k = job // nw, job % nw
        x, a, hk, dAk, Ak = xs[job], als[job], h[b, k], dA[b, k], A[k]
        zero = np.zeros(1, dtype=u.dtype)[0]  # a 0.0 literal would make the sums float64
        for c in range(ckpt.shape[1] - 1, -1, -1):
            t0 = c * chunk
            t1 = min(L, t0 + chunk)
            x[0] = ckpt[b, c, k]
            for i in range(t1 - t0):  # recompute this chunk's states
                ut, dtt = u[b, t0 + i, k], dt[b, t0 + i, k]
                for n in range(N):
                    bn, An, an, xp, xn = B[b, t0 + i, n], Ak[n], a[i, n], x[i, n], x[i + 1, n]
                    for j in range(W):
                        an[j] = _exp(dtt[j] * An[j])
                        xn[j] = an[j] * xp[j] + dtt[j] * ut[j] * bn
            for i in range(t1 - t0 - 1, -1, -1):  # adjoint recurrence, h = dL/dx_t
                t = t0 + i
                ut, dtt, g = u[b, t, k], dt[b, t, k], gy[b, t, k]
                s_b, s_a = du[b, t, k], ddt[b, t, k]  # sum_n h B ; sum_n h x_{t-1} dA A
                s_b[:] = 0
                s_a[:] = 0
                for n in range(N):
                    bn, cn = B[b, t, n], C[b, t, n]
                    hn, xn, xp, an, dAn, An = hk[n], x[i + 1, n], x[i, n], a[i, n], dAk[n], Ak[n]
                    sum_b = zero
                    sum_c = zero
                    for j in range(W):
                        hv = hn[j] + g[j] * cn
                        sum_c += g[j] * xn[j]
                        sum_b += hv * dtt[j] * ut[j]
                        s_b[j] += hv * bn
                        q = hv * xp[j] * an[j]
                        s_a[j] += q * An[j]
                        dAn[j] += q * dtt[j]
                        hn[j] = hv * an[j]
                    dB[b, k, t, n] = sum_b
                    dC[b, k, t, n] = sum_c
                for j in range(W):
                    s_a[j] += ut[j] * s_b[j]
                    s_b[j] *= dtt[j]


_NUMBA = {}
_NUMBA_LOCK = threading.Lock()
_prange = range  # replaced by numba.prange once numba is loaded


def _register_numba_exp(numba):
    """Overload ``_exp`` for numba: float32 Cephes expf and float64 degree-13
    Taylor, both after Cody-Waite reduction, 2**k built from its bits.  Both
    are accurate to about 1 ulp; arguments are clamped to the normal range
    (exp(-1000) gives 3e-308, not 0), NaN propagates."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic, overload

    @intrinsic
    def as_float(typingctx, bits, like):
        """Reinterpret the low bits of integer ``bits`` as a float of ``like``'s type."""
        def codegen(context, builder, signature, args):
            ity = ir.IntType(like.bitwidth)
            bits = builder.trunc(args[0], ity) if args[0].type.width > ity.width else args[0]
            return builder.bitcast(bits, context.get_value_type(like))
        return like(bits, like), codegen

    f32 = np.float32
    p0, p1, p2, p3, p4, p5 = (f32(v) for v in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                               4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
    lo32, hi32, l2e32, round32 = f32(-87.3), f32(88.3), f32(1.4426950408889634), f32(1.5 * 2**23)
    ln2hi32, ln2lo32, one32 = f32(0.693359375), f32(-2.12194440e-4), f32(1.0)
    t64 = tuple(1.0 / math.factorial(i) for i in range(13, 1, -1))

    @numba.njit
    def exp32(x):
        x = x if not (x < lo32) else lo32
        x = x if not (x > hi32) else hi32
        k = (x * l2e32 + round32) - round32  # round to nearest; floorf would not vectorise
        r = (x - k * ln2hi32) - k * ln2lo32
        p = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5
        return (p * r * r + r + one32) * as_float((np.int32(k) + 127) << 23, x)

    @numba.njit
    def exp64(x):
        x = x if not (x < -708.0) else -708.0
        x = x if not (x > 709.0) else 709.0
        k = (x * 1.4426950408889634 + 6755399441055744.0) - 6755399441055744.0
        r = (x - k * 0.6931471803691238) - k * 1.9082149292705877e-10
        p = 0.0
        for coef in t64:
            p = p * r + coef
        return ((p * r + 1.0) * r + 1.0) * as_float((np.int64(k) + 1023) << 52, x)

    @overload(_exp)
    def _exp_overload(x):
        return (lambda x: exp32(x)) if x == types.float32 else (lambda x: exp64(x))


def _numba_kernels():
    """Compile (or load from cache) the two kernels; None if numba is unavailable."""
    with _NUMBA_LOCK:
        return _NUMBA["kernels"] if "kernels" in _NUMBA else _load_numba()


def _load_numba():
    """Set up numba once (under the lock): the exp overload, then the two kernels."""
    try:
        import numba
    except ImportError:
        _NUMBA["kernels"] = None
        return None
    global _prange
    _prange = numba.prange
    _register_numba_exp(numba)
    jit = lambda fm: numba.njit(parallel=True, fastmath=fm, cache=True)  # noqa: E731
    _NUMBA["threads"] = numba.get_num_threads
    _NUMBA["kernels"] = (jit({"contract"})(_fwd_kernel), jit({"contract", "reassoc"})(_bwd_kernel))
    return _NUMBA["kernels"]


class _NumbaEngine:
    """CPU core for ``disc="mamba"``: one forward and one backward kernel,
    called on the blocked layouts described above."""

    def __init__(self, chunk, kernels):
        self.chunk = chunk
        self.fwd, self.bwd = kernels

    @staticmethod
    def _blocked(u, A):
        """Blocked views of (b, L, D) tensors, A (D, N) blocked, and a function
        giving a fresh blocked copy of a (b, D, N) state (the kernels write it)."""
        b, L, d = u.shape
        W = _block_width(b, d, _NUMBA["threads"]())
        seq = lambda t: t.detach().contiguous().view(b, L, d // W, W).numpy()  # noqa: E731
        blk = A.detach().t().reshape(A.shape[1], d // W, W).transpose(0, 1).contiguous()
        state_in = lambda s: s.detach().to(u.dtype).transpose(1, 2).reshape(  # noqa: E731
            b, A.shape[1], d // W, W).transpose(1, 2).clone(memory_format=torch.contiguous_format)
        return seq, blk.numpy(), state_in

    @staticmethod
    def _state_out(s):
        """(b, nw, N, W) -> (b, D, N)."""
        b, nw, N, W = s.shape
        return s.transpose(1, 2).reshape(b, N, nw * W).transpose(1, 2)

    def forward(self, u, delta, A, B, C, x0):
        seq, Ablk, state_in = self._blocked(u, A)
        b, L, nw, W = seq(u).shape
        y = u.new_empty(b, L, nw * W)
        x = state_in(x0)
        ckpt = u.new_empty((b, -(-L // self.chunk)) + x.shape[1:])
        self.fwd(seq(u), seq(delta), Ablk, B.detach().contiguous().numpy(),
                 C.detach().contiguous().numpy(), self.chunk,
                 y.view(b, L, nw, W).numpy(), ckpt.numpy(), x.numpy())
        return y, self._state_out(x), ckpt

    def backward(self, u, delta, A, B, C, ckpt, gy, gx):
        seq, Ablk, state_in = self._blocked(u, A)
        b, L, nw, W = seq(u).shape
        N = A.shape[1]
        h = state_in(gx)
        du, ddt, dA = u.new_empty(b, L, nw * W), u.new_empty(b, L, nw * W), torch.zeros_like(h)
        dB, dC = u.new_empty(b, nw, L, N), u.new_empty(b, nw, L, N)
        xs = u.new_empty(b * nw, self.chunk + 1, N, W)
        als = u.new_empty(b * nw, self.chunk, N, W)
        self.bwd(seq(u), seq(delta), Ablk, B.detach().contiguous().numpy(),
                 C.detach().contiguous().numpy(), ckpt.numpy(), seq(gy), self.chunk,
                 h.numpy(), xs.numpy(), als.numpy(), du.view(b, L, nw, W).numpy(),
                 ddt.view(b, L, nw, W).numpy(), dA.numpy(), dB.numpy(), dC.numpy())
        return (du, ddt, self._state_out(dA).sum(0), dB.sum(1), dC.sum(1),
                self._state_out(h))


# --------------------------------------------------------------------------- #
# the autograd core and the public entry point
# --------------------------------------------------------------------------- #
class _ScanCore(torch.autograd.Function):
    """(u, delta, A, B, C, x0) -> (y without skip/gate, final state), O(L/chunk) states saved."""

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


def _pick_engine(u, disc, chunk):
    """The numba engine where it applies and is wanted, else the torch one."""
    use_numba = (disc == "mamba" and u.device.type == "cpu"
                 and os.environ.get("SEQC_NO_NUMBA", "") in ("", "0"))
    kernels = _numba_kernels() if use_numba else None
    if kernels is not None:
        return _NumbaEngine(chunk or _NUMBA_CHUNK, kernels)
    return _TorchEngine(chunk or _TORCH_CHUNK, disc)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                   state=None, return_state=False, disc="mamba", chunk=None):
    """u, delta: (batch, L, D); A: (D, N) (already -exp(A_log)); B, C: (batch, L, N); D: (D,);
    z: (batch, L, D) optional gate; delta_bias: (D,) optional; state: (batch, D, N) initial state or None.
    Returns y (batch, L, D) [and final state (batch, D, N) if return_state].

    ``disc`` is "mamba" (Euler B) or "zoh"; ``chunk`` is the checkpoint
    interval (None: engine default).  Gradients reach every tensor argument.
    """
    if disc not in DISCRETIZATIONS:
        raise SeqcError(f"unknown discretization {disc!r} for the selective scan "
                        f"(expected one of {', '.join(DISCRETIZATIONS)})")
    out_dtype = u.dtype
    work = torch.float32 if out_dtype in _LOW_PRECISION else out_dtype
    cast = lambda t: None if t is None else t.to(work)  # noqa: E731
    u, delta, A, B, C, D, z, delta_bias, state = map(
        cast, (u, delta, A, B, C, D, z, delta_bias, state))
    if state is None:
        state = u.new_zeros(u.shape[0], u.shape[2], A.shape[-1])
    delta = _prep_delta(delta, delta_bias, delta_softplus)
    y, last = _ScanCore.apply(u, delta, A, B, C, state, _pick_engine(u, disc, chunk))
    y = _skip_and_gate(y, u, D, z).to(out_dtype)
    return (y, last.to(out_dtype)) if return_state else y
