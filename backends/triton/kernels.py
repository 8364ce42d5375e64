"""Launchers of the generated Triton kernels and their autograd Functions.

Owns the runtime side of ``codegen``: ``kernels(method)`` (the generated
module for a discretization, from the on-disk cache), and

* ``selective_scan(u, delta, A, B, C, D, z, delta_bias, state, lengths, ...)``
  -> ``(y, final_state)`` with gradients to every tensor argument
  (``_SelectiveScan``; whole sequence per program, or chunk-parallel with ``split``);
* ``conv1d_step``: one token, the window shifted in place;
* ``selective_step(...)``: one token, the state tensor updated in place;
* ``lti_scan(u, a, Bbar, C, D, state, lengths)``: the complex diagonal LTI
  recurrence with gradients to u, a, Bbar, C, D and the state (``_LTIScan``);
* ``conv1d(x, weight, bias, window, activation)`` (``_Conv1d``);
* ``rmsnorm(x, weight, eps, residual=None)`` (``_RMSNorm``) -> ``y`` or ``(y, x + residual)``.

Everything accumulates in float32 (float64 for float64 inputs); outputs keep
a half-precision input's dtype.  Block sizes: fixed small ones on the
interpreter, else the best of a few candidates cached by ``cache.block_sizes``.
"""
from __future__ import annotations

import functools

import torch
import triton

from seqc.discretization import derivation

from . import cache, codegen

HALF = (torch.float16, torch.bfloat16)
FLAG_NAMES = ("delta_bias", "delta_softplus", "disc", "d_skip", "gate")


def kernels(method: str):
    """The generated module (``scan_fwd``, ``scan_bwd``, ...) for discretization `method`.

    Keyed by the current derivation, so ``seqc.discretization.override`` regenerates it; sympy runs
    once per (derivation, interpreter or GPU), not per call."""
    return _module(method, codegen.interpreted(), derivation("diag", method))


@functools.lru_cache(maxsize=64)
def _module(method: str, interpret: bool, _derivation):
    return cache.load(codegen.module_source(method, interpret), key=f"interpret={interpret}")


def work_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _c(t):
    return None if t is None else t.contiguous()


def _np(n: int) -> int:
    return max(2, triton.next_power_of_2(int(n)))


def default_assoc() -> bool:
    """Within a chunk: tl.associative_scan or the sequential loop.  On the interpreter the
    associative scan is measured faster (about 1.9x at L=16..32, benchmarks/gpu_scan.py --tiny);
    no GPU has measured the two yet, so GPUs keep the loop (mamba_ssm's choice, small register tiles)."""
    return codegen.interpreted()


def default_split(programs: int, nchunks: int) -> bool:
    """Chunk-parallel forward when (batch x channel blocks) programs cannot fill the GPU by
    themselves (fewer than two per SM) and there are several chunks.  Never on the interpreter,
    which runs programs one after another (the split only adds work there)."""
    if codegen.interpreted() or nchunks < 2 or not torch.cuda.is_available():
        return False
    return programs < 2 * torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _scan_config(dim: int, n: int, length: int, device, assoc: bool = False) -> dict:
    """BLOCK_D and CHUNK of the scan kernels (fixed: no GPU has tuned them yet)."""
    if codegen.interpreted():
        return {"BLOCK_D": min(_np(dim), 8), "CHUNK": 8}
    if assoc:       # a (CHUNK, BLOCK_D, N) tile lives in registers
        return {"BLOCK_D": min(_np(dim), max(8, 256 // _np(n))), "CHUNK": 16}
    return {"BLOCK_D": min(_np(dim), max(16, 2048 // _np(n))), "CHUNK": 64}


def _gpu_ms(fn, repeat: int = 3) -> float:
    """Median milliseconds of fn() on the current CUDA device (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _ptr(t, like):
    """A real tensor or a 1-element placeholder for an absent (constexpr-disabled) argument."""
    return t if t is not None else like.new_zeros(1)


class _SelectiveScan(torch.autograd.Function):
    """(u, delta_raw, A, B, C, D, z, delta_bias, x0) -> (y, x_L) through scan_fwd / scan_bwd."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, x0, lengths, flags, assoc, split):
        work = work_dtype(u, A)
        u, delta, B, C, z, lengths = map(_c, (u, delta, B, C, z, lengths))
        Aw = A.to(work).contiguous()
        Dw = None if D is None else D.to(work).contiguous()
        bw = None if delta_bias is None else delta_bias.to(work).contiguous()
        x0w = None if x0 is None else x0.to(work).contiguous()
        batch, length, dim = u.shape
        n = A.shape[1]
        assoc = default_assoc() if assoc is None else bool(assoc)
        y = torch.empty(batch, length, dim, dtype=u.dtype if u.dtype in HALF else work, device=u.device)
        xL = torch.empty(batch, dim, n, dtype=work, device=u.device)
        k = kernels(flags["disc"])

        def launch(cfg):
            nchunks = triton.cdiv(max(length, 1), cfg["CHUNK"])
            ckpt = torch.empty(batch, nchunks, dim, n, dtype=work, device=u.device)
            if length == 0:
                xL.copy_(x0w if x0w is not None else torch.zeros_like(xL))
                ckpt.zero_()
                return ckpt
            blocks = triton.cdiv(dim, cfg["BLOCK_D"])
            use_split = default_split(batch * blocks, nchunks) if split is None else bool(split)
            if use_split:      # chunk-parallel: summaries, carry between chunks, rescan
                common = dict(NP=_np(n), BLOCK_D=cfg["BLOCK_D"], CHUNK=cfg["CHUNK"], DELTA_BIAS=bw is not None,
                              DELTA_SOFTPLUS=bool(flags["delta_softplus"]), D_SKIP=Dw is not None,
                              GATE=z is not None, HAS_LENGTHS=lengths is not None)
                S, P = torch.empty_like(ckpt), torch.empty_like(ckpt)
                args = (u, delta, Aw, B, C, _ptr(Dw, Aw), _ptr(z, u), _ptr(bw, Aw), _ptr(lengths, u))
                k.scan_chunk[(batch, blocks, nchunks)](*args, ckpt, S, P, y, length, dim, n, PHASE=1, **common)
                k.scan_carry[(batch, blocks)](S, P, _ptr(x0w, Aw), ckpt, xL, nchunks, dim, n, NP=_np(n),
                                              BLOCK_D=cfg["BLOCK_D"], HAS_X0=x0w is not None,
                                              F64=work == torch.float64)
                k.scan_chunk[(batch, blocks, nchunks)](*args, ckpt, S, P, y, length, dim, n, PHASE=3, **common)
                return ckpt
            k.scan_fwd[(batch, triton.cdiv(dim, cfg["BLOCK_D"]))](
                u, delta, Aw, B, C, _ptr(Dw, Aw), _ptr(z, u), _ptr(bw, Aw), _ptr(lengths, u),
                _ptr(x0w, Aw), Aw, Aw, Aw, Aw, y, xL, ckpt, length, dim, n,
                NP=_np(n), DELTA_BIAS=bw is not None, DELTA_SOFTPLUS=bool(flags["delta_softplus"]),
                D_SKIP=Dw is not None, GATE=z is not None, HAS_X0=x0w is not None,
                HAS_LENGTHS=lengths is not None, ASSOC=assoc, LTI=False, **cfg)
            return ckpt

        cfg = _scan_config(dim, n, length, u.device, assoc)
        if not codegen.interpreted() and length >= 1024:
            cands = [cfg] + [dict(cfg, BLOCK_D=b) for b in (32, 64, 128, 256)
                             if b != cfg["BLOCK_D"] and b <= _np(dim) and b * _np(n) <= 4096]
            key = (dim, n, str(u.dtype), assoc, flags["disc"], 1 << (length.bit_length() - 1))
            cfg = cache.block_sizes("scan_fwd", key, cands, bench=lambda c: _gpu_ms(lambda: launch(c)))
        ckpt = launch(cfg)
        ctx.save_for_backward(u, delta, Aw, B, C, Dw, z, bw, lengths, ckpt)
        ctx.meta = (flags, cfg, A.dtype, None if D is None else D.dtype,
                    None if delta_bias is None else delta_bias.dtype, None if x0 is None else x0.dtype)
        return y, xL

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gx):
        u, delta, Aw, B, C, Dw, z, bw, lengths, ckpt = ctx.saved_tensors
        flags, cfg, a_dtype, d_dtype, b_dtype, x0_dtype = ctx.meta
        batch, length, dim = u.shape
        n = Aw.shape[1]
        work = Aw.dtype
        blocks = triton.cdiv(dim, cfg["BLOCK_D"])
        gy = torch.zeros_like(u) if gy is None else gy.contiguous()
        f = dict(dtype=work, device=u.device)
        du, ddelta = torch.empty(batch, length, dim, **f), torch.empty(batch, length, dim, **f)
        dz = torch.empty(batch, length, dim, **f) if z is not None else None
        dA, dD = torch.empty(batch, dim, n, **f), torch.empty(batch, dim, **f)
        dB, dC = torch.empty(batch, blocks, length, n, **f), torch.empty(batch, blocks, length, n, **f)
        dx0 = torch.empty(batch, dim, n, **f)
        ws = torch.empty(batch, blocks, cfg["CHUNK"] + 1, cfg["BLOCK_D"], _np(n), **f)
        if length == 0:
            dx0.copy_(gx if gx is not None else torch.zeros_like(dx0))
            dA.zero_()
            dD.zero_()
        else:
            kernels(flags["disc"]).scan_bwd[(batch, blocks)](
                u, delta, Aw, B, C, _ptr(Dw, Aw), _ptr(z, u), _ptr(bw, Aw), _ptr(lengths, u), ckpt, gy,
                _ptr(None if gx is None else gx.contiguous(), Aw), ws, du, ddelta, dA, dB, dC, dD,
                _ptr(dz, du), dx0, length, dim, n, NP=_np(n), DELTA_BIAS=bw is not None,
                DELTA_SOFTPLUS=bool(flags["delta_softplus"]), D_SKIP=Dw is not None, GATE=z is not None,
                HAS_GX=gx is not None, HAS_LENGTHS=lengths is not None, **cfg)
        dbias = None if bw is None else ddelta.sum((0, 1)).to(b_dtype)
        return (du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(0).to(a_dtype), dB.sum(1).to(B.dtype),
                dC.sum(1).to(C.dtype), None if Dw is None else dD.sum(0).to(d_dtype),
                None if z is None else dz.to(z.dtype), dbias,
                None if x0_dtype is None else dx0.to(x0_dtype), None, None, None, None)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, state=None, lengths=None,
                   delta_softplus=True, disc="mamba", assoc=None, split=None):
    """Mamba's selective scan in one fused kernel: y (b, L, D) and the final state (b, D, N).

    A is the real (D, N) transition (``-exp(A_log)``); lengths (b,) ints or None; assoc picks the
    within-chunk scan (None: ``default_assoc()``); split runs the chunk-parallel forward
    (``scan_chunk`` / ``scan_carry``: chunks in parallel programs, chunk states carried between them;
    None: ``default_split``)."""
    flags = {"delta_bias": delta_bias is not None, "delta_softplus": bool(delta_softplus), "disc": disc,
             "d_skip": D is not None, "gate": "silu" if z is not None else None}
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, state, lengths, flags, assoc, split)


def selective_step(u, delta, A, B, C, D=None, z=None, delta_bias=None, state=None,
                   delta_softplus=True, disc="mamba"):
    """One token: y (b, D); `state` (b, D, N), contiguous and of the accumulator dtype, is
    updated in place (a fresh zero state when None) and returned."""
    work = work_dtype(u, A)
    batch, dim = u.shape
    n = A.shape[1]
    if state is None:
        state = torch.zeros(batch, dim, n, dtype=work, device=u.device)
    Aw = A.to(work).contiguous()
    y = torch.empty(batch, dim, dtype=u.dtype if u.dtype in HALF else work, device=u.device)
    cfg = _scan_config(dim, n, 1, u.device)
    kernels(disc).scan_step[(batch, triton.cdiv(dim, cfg["BLOCK_D"]))](
        _c(u), _c(delta), Aw, _c(B), _c(C), _ptr(None if D is None else D.to(work).contiguous(), Aw),
        _ptr(_c(z), u), _ptr(None if delta_bias is None else delta_bias.to(work).contiguous(), Aw),
        state, y, dim, n, NP=_np(n), BLOCK_D=cfg["BLOCK_D"], DELTA_BIAS=delta_bias is not None,
        DELTA_SOFTPLUS=bool(delta_softplus), D_SKIP=D is not None, GATE=z is not None)
    return y, state


class _LTIScan(torch.autograd.Function):
    """(u, a_re, a_im, Bbar_re, Bbar_im, C_re, C_im, D, x0) -> (y, x_L) through scan_fwd[LTI] / lti_bwd."""

    @staticmethod
    def forward(ctx, u, ar, ai, br, bi, cr, ci, D, x0, lengths, method):
        work = work_dtype(u, ar)
        u, lengths = _c(u), _c(lengths)
        batch, length, dim = u.shape
        s = ar.shape[1]
        parts = [t.to(work).contiguous() for t in (ar, ai, br, bi, cr, ci)]
        Dw = None if D is None else D.to(work).contiguous()
        x0w = None if x0 is None else x0.to(work).permute(0, 3, 1, 2).contiguous()   # (b, 2, H, S)
        cfg = _scan_config(dim, s, length, u.device)
        nchunks = triton.cdiv(max(length, 1), cfg["CHUNK"])
        y = torch.empty(batch, length, dim, dtype=u.dtype if u.dtype in HALF else work, device=u.device)
        xL = torch.empty(batch, 2, dim, s, dtype=work, device=u.device)
        ckpt = torch.empty(batch, nchunks, 2, dim, s, dtype=work, device=u.device)
        if length == 0:
            xL.copy_(x0w if x0w is not None else torch.zeros_like(xL))
        else:
            kernels(method).scan_fwd[(batch, triton.cdiv(dim, cfg["BLOCK_D"]))](
                u, u, parts[0], parts[2], parts[3], _ptr(Dw, parts[0]), u, parts[0], _ptr(lengths, u),
                _ptr(x0w, parts[0]), parts[0], parts[1], parts[4], parts[5], y, xL, ckpt, length, dim, s,
                NP=_np(s), DELTA_BIAS=False, DELTA_SOFTPLUS=False, D_SKIP=Dw is not None, GATE=False,
                HAS_X0=x0w is not None, HAS_LENGTHS=lengths is not None, ASSOC=False, LTI=True, **cfg)
        ctx.save_for_backward(u, *parts, Dw, lengths, ckpt)
        ctx.meta = (method, cfg, [t.dtype for t in (ar, ai, br, bi, cr, ci)], None if D is None else D.dtype,
                    None if x0 is None else x0.dtype)
        return y, xL.permute(0, 2, 3, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gx):
        u, ar, ai, br, bi, cr, ci, Dw, lengths, ckpt = ctx.saved_tensors
        method, cfg, dtypes, d_dtype, x0_dtype = ctx.meta
        batch, length, dim = u.shape
        s = ar.shape[1]
        work = ar.dtype
        f = dict(dtype=work, device=u.device)
        blocks = triton.cdiv(dim, cfg["BLOCK_D"])
        gy = torch.zeros(batch, length, dim, **f) if gy is None else gy.contiguous()
        gxw = None if gx is None else gx.to(work).permute(0, 3, 1, 2).contiguous()
        du = torch.empty(batch, length, dim, **f)
        da, dB, dC, dx0 = (torch.zeros(batch, 2, dim, s, **f) for _ in range(4))
        dD = torch.zeros(batch, dim, **f)
        if length == 0:
            if gxw is not None:
                dx0.copy_(gxw)
        else:
            ws = torch.empty(batch, blocks, cfg["CHUNK"] + 1, 2, cfg["BLOCK_D"], _np(s), **f)
            kernels(method).lti_bwd[(batch, blocks)](
                u, ar, ai, br, bi, cr, ci, _ptr(Dw, ar), _ptr(lengths, u), ckpt, gy, _ptr(gxw, ar), ws,
                du, da, dB, dC, dD, dx0, length, dim, s, NP=_np(s), BLOCK_D=cfg["BLOCK_D"], CHUNK=cfg["CHUNK"],
                D_SKIP=Dw is not None, HAS_GX=gxw is not None, HAS_LENGTHS=lengths is not None)
        da, dB, dC = (t.sum(0) for t in (da, dB, dC))
        grads = [g.to(dt) for g, dt in zip((da[0], da[1], dB[0], dB[1], dC[0], dC[1]), dtypes)]
        return (du.to(u.dtype), *grads, None if Dw is None else dD.sum(0).to(d_dtype),
                None if x0_dtype is None else dx0.permute(0, 2, 3, 1).to(x0_dtype), None, None)


def lti_scan(u, a, Bbar, C, D=None, state=None, lengths=None, disc="zoh"):
    """The complex diagonal LTI recurrence x_t = a x_{t-1} + Bbar u_t, y = 2 Re <C, x> + D u.

    a, Bbar, C: complex (H, S) (gradients flow to their real and imaginary parts);
    state (b, H, S, 2) as (re, im).  Returns y (b, L, H) and the final state (b, H, S, 2)."""
    return _LTIScan.apply(u, a.real, a.imag, Bbar.real, Bbar.imag, C.real, C.imag, D, state, lengths, disc)


# -- conv1d ---------------------------------------------------------------------------------


def _conv_blocks(length, dim):
    if codegen.interpreted():
        return {"BLOCK_L": 8, "BLOCK_D": min(_np(dim), 8)}
    return {"BLOCK_L": 32, "BLOCK_D": min(_np(dim), 64)}


class _Conv1d(torch.autograd.Function):
    """(x_padded (b, L + K - 1, D), weight (D, K), bias) -> act(causal depthwise conv)."""

    @staticmethod
    def forward(ctx, xp, weight, bias, act, method):
        xp = xp.contiguous()
        batch, padded, dim = xp.shape
        taps = weight.shape[-1]
        length = padded - taps + 1
        work = work_dtype(xp, weight)
        w = weight.reshape(dim, taps).to(work).contiguous()
        bw = None if bias is None else bias.to(work).contiguous()
        y = torch.empty(batch, length, dim, dtype=xp.dtype if xp.dtype in HALF else work, device=xp.device)
        cfg = _conv_blocks(length, dim)
        grid = (batch, triton.cdiv(max(length, 1), cfg["BLOCK_L"]), triton.cdiv(dim, cfg["BLOCK_D"]))
        if length:
            kernels(method).conv_fwd[grid](xp, w, _ptr(bw, w), y, length, dim, K=taps, BIAS=bw is not None,
                                           ACT=act, F64=work == torch.float64, **cfg)
        ctx.save_for_backward(xp, w, bw)
        ctx.meta = (act, method, weight.shape, weight.dtype, None if bias is None else bias.dtype, cfg, grid)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        xp, w, bw = ctx.saved_tensors
        act, method, w_shape, w_dtype, b_dtype, cfg, grid = ctx.meta
        batch, padded, dim = xp.shape
        taps = w.shape[1]
        length = padded - taps + 1
        work = w.dtype
        k = kernels(method)
        dpre = torch.zeros(batch, length, dim, dtype=work, device=xp.device)
        dw = torch.zeros(batch, grid[1], dim, taps, dtype=work, device=xp.device)
        db = torch.zeros(batch, grid[1], dim, dtype=work, device=xp.device)
        dxp = torch.empty(batch, padded, dim, dtype=work, device=xp.device)
        if length:
            k.conv_bwd_pre[grid](xp, w, _ptr(bw, w), gy.contiguous(), dpre, dw, db, length, dim, K=taps,
                                 BIAS=bw is not None, ACT=act, F64=work == torch.float64, **cfg)
        k.conv_bwd_input[(batch, triton.cdiv(padded, cfg["BLOCK_L"]), grid[2])](
            dpre, w, dxp, length, dim, K=taps, F64=work == torch.float64, **cfg)
        return (dxp.to(xp.dtype), dw.sum((0, 1)).reshape(w_shape).to(w_dtype),
                None if bw is None else db.sum((0, 1)).to(b_dtype), None, None)


def conv1d(x, weight, bias=None, window=None, activation="identity", method="mamba"):
    """Causal depthwise conv over time of x (b, L, D) with weight (D, 1, K), after `window`
    (b, D, K - 1) of earlier inputs (zeros when None), then `activation` (a key of
    codegen.ACTIVATION_CODES).  Returns y (b, L, D) and the window-padded input (b, L + K - 1, D)."""
    taps = weight.shape[-1]
    if window is None:
        window = x.new_zeros(x.shape[0], x.shape[2], taps - 1)
    xp = torch.cat([window.to(x.dtype).transpose(1, 2), x], 1)
    return _Conv1d.apply(xp, weight, bias, codegen.ACTIVATION_CODES[activation], method), xp


def conv1d_step(x_t, weight, bias, window, activation="identity", method="mamba"):
    """One token through the causal depthwise conv: y (b, D); `window` (b, D, K - 1), contiguous,
    is shifted in place (its oldest input dropped, x_t appended) and returned."""
    batch, dim = x_t.shape
    taps = weight.shape[-1]
    work = work_dtype(x_t, weight)
    w = weight.reshape(dim, taps).to(work).contiguous()
    y = torch.empty(batch, dim, dtype=x_t.dtype if x_t.dtype in HALF else work, device=x_t.device)
    block = min(_np(dim), 8 if codegen.interpreted() else 128)
    kernels(method).conv_step[(batch, triton.cdiv(dim, block))](
        _c(x_t), window, w, _ptr(None if bias is None else bias.to(work).contiguous(), w), y, dim, K=taps,
        KP=_np(taps), BIAS=bias is not None, ACT=codegen.ACTIVATION_CODES[activation], BLOCK_D=block,
        F64=work == torch.float64)
    return y, window


# -- rmsnorm --------------------------------------------------------------------------------


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, method):
        shape = x.shape
        dim = shape[-1]
        x2 = x.reshape(-1, dim).contiguous()
        r2 = None if residual is None else residual.reshape(-1, dim).contiguous()
        work = work_dtype(x, weight)
        rows = x2.shape[0]
        out_dtype = x.dtype if x.dtype in HALF else work
        y = torch.empty(rows, dim, dtype=out_dtype, device=x.device)
        s = torch.empty(rows, dim, dtype=work, device=x.device) if r2 is not None else None
        rstd = torch.empty(rows, dtype=work, device=x.device)
        w = weight.to(work).contiguous()
        if rows:
            kernels(method).rmsnorm_fwd[(rows,)](x2, _ptr(r2, x2), w, y, _ptr(s, w), rstd, dim, float(eps),
                                                 RESIDUAL=r2 is not None, BLOCK=_np(dim),
                                                 F64=work == torch.float64)
        saved = s if s is not None else x2
        ctx.save_for_backward(saved, w, rstd)
        ctx.meta = (shape, x.dtype, None if residual is None else residual.dtype, weight.dtype, method)
        ssum = None if s is None else s.to(out_dtype).reshape(shape)
        if ssum is not None:
            return y.reshape(shape), ssum
        return y.reshape(shape), y.new_empty(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gs):
        s, w, rstd = ctx.saved_tensors
        shape, x_dtype, r_dtype, w_dtype, method = ctx.meta
        dim = shape[-1]
        rows = s.shape[0]
        gy = torch.zeros(shape, dtype=s.dtype, device=s.device) if gy is None else gy
        has_gs = r_dtype is not None and gs is not None
        ds = torch.empty(rows, dim, dtype=w.dtype, device=s.device)
        dw = torch.empty(rows, dim, dtype=w.dtype, device=s.device)
        if rows:
            kernels(method).rmsnorm_bwd[(rows,)](s, w, rstd, gy.reshape(-1, dim).contiguous(),
                                                 gs.reshape(-1, dim).contiguous() if has_gs else w, ds, dw,
                                                 dim, HAS_GS=has_gs, BLOCK=_np(dim), F64=w.dtype == torch.float64)
        ds = ds.reshape(shape)
        return (ds.to(x_dtype), None if r_dtype is None else ds.to(r_dtype), dw.sum(0).to(w_dtype), None, None)


def rmsnorm(x, weight, eps=1e-5, residual=None, method="mamba"):
    """y = s * rsqrt(mean(s^2) + eps) * weight with s = x (+ residual); returns y, or (y, s)."""
    y, s = _RMSNorm.apply(x, residual, weight, eps, method)
    return y if residual is None else (y, s)


def available() -> str | None:
    """None when the kernels can run here, else the reason."""
    try:
        import triton.language  # noqa: F401
    except Exception as exc:   # pragma: no cover - triton is a declared dependency
        return f"triton cannot be imported: {exc}"
    if codegen.interpreted() or torch.cuda.is_available():
        return None
    return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU interpreter)"
