"""Selective scan (the ``selective_ssm`` layer) for the torch backend.

Owns ``selective_scan`` (whole sequences, with gradients to every input
including the initial state) and ``selective_scan_step`` (one token, for
decoding).  Semantics are mamba_ssm's ``selective_scan_ref`` (CONTRACT.md)::

    delta = softplus(delta + delta_bias)            # optional bias / softplus
    x_t   = exp(delta_t * A) * x_{t-1} + dB_t * u_t # per (batch, d, n)
    y_t   = <C_t, x_t> + D * u_t ;  y = y * silu(z)  # optional skip / gate

with ``dB_t = delta_t * B_t`` (``disc="mamba"``) or
``dB_t = expm1(delta_t * A) / A * B_t`` (``disc="zoh"``).

Memory: the ``(batch, L, D, N)`` states are never kept for backward.  The
core recurrence is a custom ``autograd.Function`` that saves only the state
at every ``chunk``-th step; backward recomputes one chunk of states at a
time and runs the adjoint recurrence ``h_{t-1} = dA_t * h_t + C_{t-1} dy_{t-1}``
backwards through it.  Two engines implement that core:

* ``_NumbaEngine`` (CPU, ``disc="mamba"``, numba importable, ``SEQC_NO_NUMBA``
  unset): fused JIT kernels parallel over (batch, channel), state in a small
  local buffer, analytic adjoint.
* ``_TorchEngine`` (everything else, any device): chunks vectorised with a
  Hillis-Steele scan, sequential across chunks; backward re-runs each chunk
  under autograd from its checkpoint.

Softplus, bias, the ``D`` skip and the gate are plain torch ops around the
core, so autograd handles them (they only need O(batch*L*D) memory).
bf16/fp16 inputs are computed in float32 and returned in the input dtype.
"""
import math
import os

import torch
import torch.nn.functional as F

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_NUMBA_CHUNK = 64
_TORCH_CHUNK = 64


# --------------------------------------------------------------------------- #
# elementwise pieces shared by the step function and the torch engine
# --------------------------------------------------------------------------- #
def _prep_delta(delta, delta_bias, delta_softplus):
    if delta_bias is not None:
        delta = delta + delta_bias
    return F.softplus(delta) if delta_softplus else delta


def _discretize(delta, A, B, disc):
    """delta (..., D), A (D, N), B (..., N) -> (dA, dB), each (..., D, N)."""
    dtA = delta.unsqueeze(-1) * A
    if disc == "mamba":
        dB = delta.unsqueeze(-1) * B.unsqueeze(-2)
    elif disc == "zoh":
        dB = torch.expm1(dtA) / A * B.unsqueeze(-2)
    else:
        raise ValueError(f"unknown discretization {disc!r} (expected 'mamba' or 'zoh')")
    return torch.exp(dtA), dB


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
    y = torch.einsum("bdn,bn->bd", state, C_t)
    return _skip_and_gate(y, u_t, D, z_t), state


# --------------------------------------------------------------------------- #
# torch engine: vectorised chunks, autograd recompute in backward
# --------------------------------------------------------------------------- #
def _chunk_forward(x0, u, delta, A, B, C, disc):
    """Scan one chunk. x0 (b, D, N); u, delta (b, T, D); B, C (b, T, N).
    Returns (y (b, T, D), last state (b, D, N))."""
    a, bu = _discretize(delta, A, B, disc)
    bu = bu * u.unsqueeze(-1)
    T, s = u.shape[1], 1
    while s < T:  # inclusive Hillis-Steele scan of (a, bu) pairs along time
        bu = torch.cat([bu[:, :s], a[:, s:] * bu[:, :-s] + bu[:, s:]], 1)
        a = torch.cat([a[:, :s], a[:, s:] * a[:, :-s]], 1)
        s *= 2
    x = a * x0.unsqueeze(1) + bu
    return torch.einsum("btdn,btn->btd", x, C), x[:, -1]


class _TorchEngine:
    """Pure-torch core: works on any device and for every discretization."""

    def __init__(self, chunk, disc):
        self.chunk, self.disc = chunk, disc

    def _spans(self, L):
        return [(t, min(t + self.chunk, L)) for t in range(0, L, self.chunk)]

    def forward(self, u, delta, A, B, C, x0):
        ys, ckpts, x = [], [], x0
        for t0, t1 in self._spans(u.shape[1]):
            ckpts.append(x)
            y, x = _chunk_forward(x, u[:, t0:t1], delta[:, t0:t1], A, B[:, t0:t1],
                                  C[:, t0:t1], self.disc)
            ys.append(y)
        return torch.cat(ys, 1), x, torch.stack(ckpts)

    def backward(self, u, delta, A, B, C, ckpts, gy, gx):
        parts, dA = [], torch.zeros_like(A)
        spans = self._spans(u.shape[1])
        for c in reversed(range(len(spans))):
            t0, t1 = spans[c]
            leaves = [t.detach().requires_grad_() for t in
                      (ckpts[c], u[:, t0:t1], delta[:, t0:t1], A, B[:, t0:t1], C[:, t0:t1])]
            with torch.enable_grad():
                y, xT = _chunk_forward(*leaves, self.disc)
                grads = torch.autograd.grad((y, xT), leaves, (gy[:, t0:t1], gx))
            gx = grads[0]
            dA += grads[3]
            parts.append(grads[1:3] + grads[4:])
        du, ddelta, dB, dC = (torch.cat(g[::-1], 1) for g in zip(*parts))
        return du, ddelta, dA, dB, dC, gx


# --------------------------------------------------------------------------- #
# numba engine: fused kernels, analytic adjoint
# --------------------------------------------------------------------------- #
def _fwd_kernel(u, dt, A, B, C, x0, chunk, y, ckpt, xL):  # pragma: no cover - JIT
    """u, dt, y: (b, D, L); A (D, N); B, C (b, L, N); x0, xL (b, D, N);
    ckpt (b, D, nchunks, N) receives the state before each chunk."""
    nb, nd, L = u.shape
    N = A.shape[1]
    for job in _prange(nb * nd):
        b, d = job // nd, job % nd
        x = xL[b, d]
        x[:] = x0[b, d]
        for t in range(L):
            if t % chunk == 0:
                ckpt[b, d, t // chunk, :] = x
            dtt = dt[b, d, t]
            dtu = dtt * u[b, d, t]
            acc = 0.0
            for n in range(N):
                x[n] = math.exp(dtt * A[d, n]) * x[n] + dtu * B[b, t, n]
                acc += C[b, t, n] * x[n]
            y[b, d, t] = acc


def _bwd_kernel(u, dt, A, B, C, ckpt, gy, gx, chunk, nblk,
                xs, als, du, ddt, dA, dB, dC):  # pragma: no cover - JIT
    """Adjoint of ``_fwd_kernel``.  Jobs are (batch, block of channels); job j
    owns workspaces xs[j] (chunk+1, N), als[j] (chunk, N) and partial sums
    dB[j], dC[j] (L, N).  gx (b, D, N) enters as the final-state gradient and
    leaves as the initial-state gradient; dA (b, D, N) is per batch."""
    nb, nd, L = u.shape
    N = A.shape[1]
    nck = ckpt.shape[2]
    for job in _prange(nb * nblk):
        b, k = job // nblk, job % nblk
        x, a, h = xs[job], als[job], gx[b]
        for d in range(k * nd // nblk, (k + 1) * nd // nblk):
            for c in range(nck - 1, -1, -1):
                t0 = c * chunk
                t1 = min(L, t0 + chunk)
                x[0, :] = ckpt[b, d, c]
                for t in range(t0, t1):  # recompute this chunk's states
                    i = t - t0
                    dtu = dt[b, d, t] * u[b, d, t]
                    for n in range(N):
                        a[i, n] = math.exp(dt[b, d, t] * A[d, n])
                        x[i + 1, n] = a[i, n] * x[i, n] + dtu * B[b, t, n]
                for t in range(t1 - 1, t0 - 1, -1):  # adjoint recurrence
                    i = t - t0
                    g, dtt, ut = gy[b, d, t], dt[b, d, t], u[b, d, t]
                    s_b = 0.0
                    s_a = 0.0
                    for n in range(N):
                        hn = h[d, n] + g * C[b, t, n]
                        dC[job, t, n] += g * x[i + 1, n]
                        dB[job, t, n] += hn * dtt * ut
                        s_b += hn * B[b, t, n]
                        q = hn * x[i, n] * a[i, n]
                        s_a += q * A[d, n]
                        dA[b, d, n] += q * dtt
                        h[d, n] = hn * a[i, n]
                    ddt[b, d, t] = ut * s_b + s_a
                    du[b, d, t] = dtt * s_b


_NUMBA = {}


def _numba_kernels():
    """Compile (or load from cache) the two kernels; None if numba is unavailable."""
    if "kernels" not in _NUMBA:
        try:
            import numba
        except ImportError:
            _NUMBA["kernels"] = None
        else:
            global _prange
            _prange = numba.prange
            jit = numba.njit(parallel=True, fastmath=False, cache=True)
            _NUMBA["kernels"] = (jit(_fwd_kernel), jit(_bwd_kernel))
    return _NUMBA["kernels"]


_prange = range  # replaced by numba.prange once numba is loaded


class _NumbaEngine:
    """CPU core for ``disc="mamba"``: one forward and one backward kernel."""

    def __init__(self, chunk, kernels):
        self.chunk = chunk
        self.fwd, self.bwd = kernels

    @staticmethod
    def _cl(t):  # (b, L, D) torch -> contiguous (b, D, L) numpy
        return t.detach().transpose(1, 2).contiguous().numpy()

    def forward(self, u, delta, A, B, C, x0):
        b, L, d = u.shape
        nck = -(-L // self.chunk)
        y = torch.empty(b, d, L, dtype=u.dtype)
        ckpt = torch.empty(b, d, nck, A.shape[1], dtype=u.dtype)
        xL = torch.empty_like(x0)
        self.fwd(self._cl(u), self._cl(delta), A.detach().contiguous().numpy(),
                 B.detach().contiguous().numpy(), C.detach().contiguous().numpy(),
                 x0.detach().contiguous().numpy(), self.chunk,
                 y.numpy(), ckpt.numpy(), xL.numpy())
        return y.transpose(1, 2), xL, ckpt

    def backward(self, u, delta, A, B, C, ckpt, gy, gx):
        b, L, d = u.shape
        N = A.shape[1]
        nblk = min(d, max(1, -(-4 * torch.get_num_threads() // b)))
        jobs = b * nblk
        new = lambda *shape: torch.zeros(*shape, dtype=u.dtype)  # noqa: E731
        du, ddt = new(b, d, L), new(b, d, L)
        dA, dB, dC = new(b, d, N), new(jobs, L, N), new(jobs, L, N)
        h = gx.detach().to(u.dtype).contiguous().clone()
        self.bwd(self._cl(u), self._cl(delta), A.detach().contiguous().numpy(),
                 B.detach().contiguous().numpy(), C.detach().contiguous().numpy(),
                 ckpt.numpy(), self._cl(gy), h.numpy(), self.chunk, nblk,
                 new(jobs, self.chunk + 1, N).numpy(), new(jobs, self.chunk, N).numpy(),
                 du.numpy(), ddt.numpy(), dA.numpy(), dB.numpy(), dC.numpy())
        fold = lambda t: t.view(b, nblk, L, N).sum(1)  # noqa: E731
        return du.transpose(1, 2), ddt.transpose(1, 2), dA.sum(0), fold(dB), fold(dC), h


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
    def backward(ctx, gy, gx):
        u, delta, A, B, C, ckpt = ctx.saved_tensors
        gy = torch.zeros_like(u) if gy is None else gy
        gx = u.new_zeros(u.shape[0], u.shape[2], A.shape[1]) if gx is None else gx
        grads = ctx.engine.backward(u, delta, A, B, C, ckpt, gy, gx)
        return grads + (None,)


def _pick_engine(u, disc, chunk):
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
    if disc not in ("mamba", "zoh"):
        raise ValueError(f"unknown discretization {disc!r} (expected 'mamba' or 'zoh')")
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
