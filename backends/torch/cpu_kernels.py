"""Generated numba kernels for the diagonal linear recurrence on CPU.

Owns the kernel *template* and its specialisation, the on-disk kernel cache,
numba's set-up (the vectorisable ``_exp`` and ``_log1p``), and thread-count hygiene.

The kernels run, per (batch, block of channels) job and per time step t,

    prologue   a_t, b_t from the discretization program     (printed, not written here)
    core       x_t = a_t * x_{t-1} + b_t                      (the generic recurrence)
    epilogue   y_t = <C_t, x_t>                               (contraction)

and the backward kernel recomputes each chunk of states from its checkpoint,
runs the adjoint ``h_{t-1} = a_t h_t`` and differentiates the prologue with the
printed *derivative* program (d Abar, d gain by d A, d dt, derived with sympy
at compile time).  Nothing in this file spells a discretization: the
prologue's statements come from ``DiscProgram.kernel`` / ``kernel_grad``
printed for the ``numba`` target, where ``exp`` is ``_exp`` and ``log1p`` is
``_log1p`` (libm's would be a scalar call per element: softplus in the
prologue then cost more than the whole recurrence).

Kernels are specialised by the discretization program (when its B gain is
just dt, sums over the state are factored out of the inner loop) and by the
fusion region's flags (``scan.kernel_flags``): ``delta_bias`` and
``delta_softplus`` make the prologue on the raw delta, ``d_skip`` and
``gate`` ("silu") the epilogue that writes the final y.  softplus and silu and
their derivatives are the scalar programs of
``seqc.discretization.activation_program``, printed like the discretization;
the backward kernel applies their chain rules and accumulates d bias and d D
per (batch, block), recomputing the pre-gate output from the states.

Cache: the generated module is written (atomically: temp file + ``os.replace``)
to ``$SEQC_CACHE_DIR``, else ``$XDG_CACHE_HOME/seqc``, else ``~/.cache/seqc``,
as ``kernels_<hash of source>.py`` and imported from there, so numba's
``cache=True`` keeps the machine code beside it.  A directory that cannot be
written, or a module that fails to load, falls back to compiling in memory;
numba index files that do not unpickle (a truncated write) are removed first.
The first compilation with a cold cache prints one line on stderr.

Threads: each module has serial kernels (``fwd``/``bwd`` over a range of (batch, channel
block) jobs) and their ``parallel=True`` twins (``_parallel_twin``).  At one thread of
torch's count, and for small calls (``PARALLEL_MIN_WORK``), the serial kernel runs in
the calling thread, and a process that makes no other calls never compiles the twins
(their parallel lowering is about half of a cold start's compile time).  Otherwise
the twin runs on numba's threads, whose count follows torch's at each launch; numba's
OpenMP layer shares torch's OpenMP runtime, so its threads are the ones torch's ops
just used (a pool of seqc's own lost a core to OpenMP's spin-waiting threads:
measured, no faster at two threads than at one).  numba's ``workqueue`` threading layer
aborts the process when two Python threads launch parallel kernels at once, so launches
are serialised until numba has chosen its layer, and for good when it chose workqueue
(``_launch_guard``); numba's own settings (``NUMBA_THREADING_LAYER``) are left as the
user set them, and torch's thread count is put back if numba's layer changed it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import os
import pickle
import sys
import tempfile
import threading

import numpy as np

_LOCK = threading.Lock()
_LAUNCH_LOCK = threading.Lock()     # serialises parallel launches where numba's threading layer needs it
_STATE: dict = {}           # "numba": module or None, "kernels": {key: _Guarded}, "announced": bool,
                            # "threading_layer": numba's, once a parallel launch has chosen it


def _exp(x):
    """exp; inside the kernels, the numba overload registered by ``_setup``."""
    return math.exp(x)


def _log1p(x):
    """log1p; inside the kernels, the numba overload registered by ``_setup``."""
    return math.log1p(x)


def _register_numba_exp(numba):
    """Overload ``_exp`` and ``_log1p`` for numba, branch-free so loops calling them
    vectorise (libm's would keep every loop scalar); compiled without fast-math so
    the reductions stay exact.

    exp: float32 Cephes expf and float64 degree-13 Taylor, both after Cody-Waite
    reduction, 2**k built from its bits; about 1 ulp; arguments are clamped to the
    normal range (exp(-1000) gives 3e-308, not 0), NaN propagates.

    log1p: fdlibm's (musl's log1p / log1pf): 1 + x split into 2**k * m with m in
    [sqrt(1/2), sqrt(2)) by integer operations on its bits, log(m) from
    s = f / (2 + f), f = m - 1 (Lg1..Lg7 in float64, Lg1..Lg4 in float32), the
    rounding of 1 + x corrected by c / (1 + x); about 1 ulp.  x = -1 gives -inf,
    x < -1 NaN, +inf and NaN themselves."""
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

    @intrinsic
    def as_bits(typingctx, x):
        """The bits of float ``x`` as a signed integer of its width."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(x.bitwidth))
        return (types.int32 if x.bitwidth == 32 else types.int64)(x), codegen

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

    # log1p, float32 (musl log1pf)
    lg1f, lg2f, lg3f, lg4f = (f32(v) for v in (0.66666662693, 0.40000972152, 0.28498786688, 0.24279078841))
    l2hf, l2lf, zero32, half32, two32 = f32(6.9313812256e-01), f32(9.0580006145e-06), f32(0), f32(0.5), f32(2)
    inf32, nan32 = f32(np.inf), f32(np.nan)

    @numba.njit(error_model="numpy")          # x = -1 divides by 0 (then replaced by -inf)
    def log1p32(x):
        u = one32 + x
        ix = as_bits(u) + np.int32(0x3f800000 - 0x3f3504f3)
        k = (ix >> 23) - 0x7f
        m = as_float((ix & 0x007fffff) + 0x3f3504f3, x)          # in [sqrt(1/2), sqrt(2))
        c = (one32 - (u - x) if k >= 2 else x - (u - one32)) / u  # 1 + x's rounding error / (1 + x)
        f = m - one32 if k != 0 else x
        c = c if k != 0 else zero32
        s = f / (two32 + f)
        z = s * s
        w = z * z
        r = z * (lg1f + w * lg3f) + w * (lg2f + w * lg4f)
        hfsq = half32 * f * f
        dk = f32(k)
        y = s * (hfsq + r) + (dk * l2lf + c) - hfsq + f + dk * l2hf
        y = y if u > zero32 else (-inf32 if u == zero32 else nan32)
        y = y if x != zero32 else x                                # -0 stays -0
        return y if x < inf32 else x                               # +inf and NaN

    lg = (6.666666666666735130e-01, 3.999999999940941908e-01, 2.857142874366239149e-01,
          2.222219843214978396e-01, 1.818357216161805012e-01, 1.531383769920937332e-01,
          1.479819860511658591e-01)
    lg1, lg2, lg3, lg4, lg5, lg6, lg7 = lg
    l2h, l2l = 6.93147180369123816490e-01, 1.90821492927058770002e-10

    @numba.njit(error_model="numpy")
    def log1p64(x):
        u = 1.0 + x
        ix = as_bits(u) + np.int64(0x3ff00000 - 0x3fe6a09e) * 4294967296
        k = (ix >> 52) - 0x3ff
        m = as_float((ix & 0x000fffffffffffff) + np.int64(0x3fe6a09e) * 4294967296, x)
        c = (1.0 - (u - x) if k >= 2 else x - (u - 1.0)) / u
        f = m - 1.0 if k != 0 else x
        c = c if k != 0 else 0.0
        s = f / (2.0 + f)
        z = s * s
        w = z * z
        r = z * (lg1 + w * (lg3 + w * (lg5 + w * lg7))) + w * (lg2 + w * (lg4 + w * lg6))
        hfsq = 0.5 * f * f
        dk = float(k)
        y = s * (hfsq + r) + (dk * l2l + c) - hfsq + f + dk * l2h
        y = y if u > 0.0 else (-np.inf if u == 0.0 else np.nan)
        y = y if x != 0.0 else x
        return y if x < np.inf else x

    @overload(_exp)
    def _exp_overload(x):
        return (lambda x: exp32(x)) if x == types.float32 else (lambda x: exp64(x))

    @overload(_log1p)
    def _log1p_overload(x):
        return (lambda x: log1p32(x)) if x == types.float32 else (lambda x: log1p64(x))


def wanted() -> bool:
    """Whether the numba kernels may be used at all (``SEQC_NO_NUMBA`` unset or 0); reads
    the environment on each call, and does not import numba."""
    return os.environ.get("SEQC_NO_NUMBA", "") in ("", "0")


def numba_module():
    """numba, set up once (the exp overload); None when it cannot be imported."""
    with _LOCK:
        if "numba" not in _STATE:
            try:
                import numba
            except ImportError:
                numba = None
            if numba is not None:
                _register_numba_exp(numba)
            _STATE["numba"] = numba
            _STATE["kernels"] = {}
        return _STATE["numba"]


# --------------------------------------------------------------------------- #
# the template
# --------------------------------------------------------------------------- #
_COPY2 = '''

@numba.njit(inline="always", cache=_CACHE)
def _copy2(dst, src):
    """dst[:, :] = src[:, :] by loops: a whole-slice assignment makes numba compile its
    broadcast and shape-error machinery (seconds of a cold start)."""
    for n in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[n, j] = src[n, j]
'''  # in both kernel modules' headers

_HEADER = '''\
"""seqc: generated CPU kernels of the diagonal linear recurrence ({method}; {flags}).
Prologue/epilogue printed from the discretization's scalar programs; regenerate, do not edit."""
import math

import numba
import numpy as np

from {exp_module} import _exp, _log1p

_CACHE = {cache}
{copy2}# runtime version: {version}
'''

_FWD = """
@numba.njit(nogil=True, fastmath={{"contract"}}, error_model="numpy", cache=_CACHE)
def fwd(j0, j1, u, dt, A, B, C, Dv, z, bias, chunk, y, ckpt, x):
    \"""Runs the jobs j0 <= b * nw + k < j1.  u, dt (raw), z, y: (b, L, nw, W); A: (nw, N, W);
    B, C: (b, L, N); Dv, bias: (nw, W); x (b, nw, N, W) holds the initial state on entry and
    the final state on exit; ckpt (b, nchunks, nw, N, W) gets the state before each chunk.
    y is the final output (after the skip and the gate where the flags have them).\"""
    nb, L, nw, W = u.shape
    N = A.shape[1]
    for job in range(j0, j1):
        b, k = job // nw, job % nw
        xk, Ak = x[b, k], A[k]
        dl = np.empty(W, dtype=u.dtype)
        for t in range(L):
            if t % chunk == 0:
                _copy2(ckpt[b, t // chunk, k], xk)
            ut, dtt, yt = u[b, t, k], dt[b, t, k], y[b, t, k]
            for j in range(W):                            # prologue: delta (bias, softplus)
{delta_fwd}
                yt[j] = 0
            for n in range(N):
                bn, cn, xn, An = B[b, t, n], C[b, t, n], xk[n], Ak[n]
                for j in range(W):
                    A_re = An[j]
                    delta = dl[j]
{prologue}
                    v = {a} * xn[j] + {gain} * ut[j] * bn    # core: x_t = a_t x_(t-1) + b_t
                    xn[j] = v
                    yt[j] += cn * v                       # epilogue: y_t = <C_t, x_t>
{epilogue_fwd}
"""

_BWD = """
@numba.njit(nogil=True, fastmath={{"contract", "reassoc"}}, error_model="numpy", cache=_CACHE)
def bwd(j0, j1, u, dt, A, B, C, Dv, z, bias, ckpt, gy, chunk, h, xs, als, du, ddt, dA, dB, dC, dD, dbias, dz):
    \"""Adjoint of fwd (same layouts).  h (b, nw, N, W) enters as the final-state gradient and
    leaves as the initial-state gradient; dA (b, nw, N, W), dD, dbias (b, nw, W) start at zero;
    job j owns the workspaces xs[j] (chunk+1, N, W) and als[j] (chunk, N, W) and writes its
    block's share of dB and dC into dB[b, k], dC[b, k] (L, N).  ddt is the raw delta's gradient.\"""
    nb, L, nw, W = u.shape
    N = A.shape[1]
    for job in range(j0, j1):
        b, k = job // nw, job % nw
        x, a, hk, dAk, Ak = xs[job], als[job], h[b, k], dA[b, k], A[k]
        dl = np.empty(W, dtype=u.dtype)
        ds = np.empty(W, dtype=u.dtype)     # d delta / d raw delta
        g = np.empty(W, dtype=u.dtype)      # gradient of the contraction's output
        zero = np.zeros(1, dtype=u.dtype)[0]  # a 0.0 literal would make the sums float64
        for c in range(ckpt.shape[1] - 1, -1, -1):
            t0 = c * chunk
            t1 = min(L, t0 + chunk)
            _copy2(x[0], ckpt[b, c, k])
            for i in range(t1 - t0):  # recompute this chunk's states
                ut, dtt = u[b, t0 + i, k], dt[b, t0 + i, k]
                for j in range(W):
{delta_fwd_b}
                for n in range(N):
                    bn, An, an, xp, xn = B[b, t0 + i, n], Ak[n], a[i, n], x[i, n], x[i + 1, n]
                    for j in range(W):
                        A_re = An[j]
                        delta = dl[j]
{prologue}
                        an[j] = {a}
                        xn[j] = an[j] * xp[j] + {gain} * ut[j] * bn
            for i in range(t1 - t0 - 1, -1, -1):  # adjoint recurrence, h = dL/dx_t
                t = t0 + i
                ut, dtt, gyt = u[b, t, k], dt[b, t, k], gy[b, t, k]
                s_b, s_a = du[b, t, k], ddt[b, t, k]
                for j in range(W):
{delta_bwd}
                    s_b[j] = 0
                    s_a[j] = 0
{epilogue_bwd}
                for n in range(N):
                    bn, cn = B[b, t, n], C[b, t, n]
                    hn, xn, xp, an, dAn, An = hk[n], x[i + 1, n], x[i, n], a[i, n], dAk[n], Ak[n]
                    sum_b = zero
                    sum_c = zero
                    for j in range(W):
                        A_re = An[j]
                        delta = dl[j]
                        Abar = an[j]
{grad_prologue}
                        hv = hn[j] + g[j] * cn
                        sum_c += g[j] * xn[j]
                        sum_b += hv * {gain_b} * ut[j]
                        s_b[j] += hv * bn{gain_u}
                        qa = hv * xp[j]
{grad_terms}
                        hn[j] = hv * an[j]
                    dB[b, k, t, n] = sum_b
                    dC[b, k, t, n] = sum_c
{channel_terms}
"""


def _indent(lines, n):
    return "\n".join(" " * n + ln for ln in lines) if lines else " " * n + "pass"


def _scaled(factor: str, deriv, program, name) -> str | None:
    """``factor * d`` for the derivative output ``name`` (None when it is 0)."""
    c = program.constant(name)
    if c == 0.0:
        return None
    if c == 1.0:
        return factor
    text = deriv[name]
    return f"{factor} * {text}" if text.isidentifier() else f"{factor} * ({text})"


FLAGS = ("delta_bias", "delta_softplus", "d_skip", "gate")


def normalise_flags(flags) -> tuple:
    """The kernel specialisation as a hashable tuple (delta_bias, delta_softplus, d_skip, gate)."""
    if isinstance(flags, tuple):
        flags = dict(zip(FLAGS, flags))
    flags = flags or {}
    gate = flags.get("gate")
    if gate not in (None, False, True, "silu"):
        raise ValueError(f"the fused scan kernel has no gate {gate!r}")
    return (bool(flags.get("delta_bias")), bool(flags.get("delta_softplus")), bool(flags.get("d_skip")),
            "silu" if gate else None)


def _act(name, arg, prefix):
    """(statements, f, df) of the activation program ``name`` at ``arg`` (printed for numba)."""
    from seqc.discretization import activation_program
    lines, out = activation_program(name).inline("numba", {"x": arg}, prefix=prefix)
    return lines, out["f"], out["df"]


def _delta_lines(bias, softplus, grad):
    """The prologue on the raw delta: dl[j] (and ds[j] = d dl / d raw, when ``grad``)."""
    raw = "dtt[j] + bias[k, j]" if bias else "dtt[j]"
    if not softplus:
        return [f"dl[j] = {raw}"] + (["ds[j] = 1"] if grad else [])
    lines, f, df = _act("softplus", "_r", "_sp")
    return [f"_r = {raw}"] + lines + [f"dl[j] = {f}"] + ([f"ds[j] = {df}"] if grad else [])


def _epilogue(d_skip, gate):
    """Forward: y = <C, x> (+ D u) (* silu(z)), in place in yt after the state loop."""
    body = []
    if d_skip:
        body.append("yv = yt[j] + Dv[k, j] * ut[j]")
    else:
        body.append("yv = yt[j]")
    if gate:
        lines, f, _ = _act("silu", "zt[j]", "_sg")
        body += lines + [f"yt[j] = yv * {f}"]
    elif d_skip:
        body.append("yt[j] = yv")
    else:
        return []
    head = ["zt = z[b, t, k]"] if gate else []
    return head + ["for j in range(W):"] + ["    " + ln for ln in body]


def _epilogue_grad(d_skip, gate):
    """Backward, per step before the adjoint: g = d loss / d <C, x> from gy (the gate's
    chain rule, dz), with the skip's dD; the pre-gate output is recomputed from the states."""
    if not gate:
        lines = ["for j in range(W):", "    g[j] = gyt[j]"]
    else:
        sl, f, df = _act("silu", "zt[j]", "_sg")
        lines = ["for j in range(W):", "    g[j] = " + ("Dv[k, j] * ut[j]" if d_skip else "zero"),
                 "for n in range(N):     # the pre-gate output, from the recomputed states",
                 "    cn, xn = C[b, t, n], x[i + 1, n]",
                 "    for j in range(W):", "        g[j] += cn * xn[j]",
                 "zt, dzt = z[b, t, k], dz[b, t, k]",
                 "for j in range(W):"] + ["    " + ln for ln in sl] + [
                 f"    dzt[j] = gyt[j] * g[j] * ({df})", f"    g[j] = gyt[j] * {f}"]
    if d_skip:
        lines += ["for j in range(W):", "    dD[b, k, j] += g[j] * ut[j]"]
    return lines


def _epilogue_channel(bias, softplus, d_skip):
    """After the adjoint of one step: the skip's du, the prologue's chain rule, d bias."""
    body = []
    if d_skip:
        body.append("s_b[j] += g[j] * Dv[k, j]")
    if softplus:
        body.append("s_a[j] *= ds[j]")
    if bias:
        body.append("dbias[b, k, j] += s_a[j]")
    return ["for j in range(W):"] + ["    " + ln for ln in body] if body else []


def _parallel_twin(kernel: str) -> str:
    """The ``parallel=True`` twin of a serial kernel's source: all jobs, split over numba's
    threads (``numba.prange``), named ``<name>_parallel``.  numba compiles it on its first
    call only, so a process running at one thread never pays for its parallel lowering
    (about half the kernels' compile time)."""
    head, sep, rest = kernel.partition("@numba.njit(nogil=True, ")
    assert sep, "not a serial kernel"
    name = rest.split("def ", 1)[1].split("(", 1)[0]
    twin = head + "@numba.njit(parallel=True, " + rest
    twin = twin.replace(f"def {name}(j0, j1, ", f"def {name}_parallel(", 1)
    twin = twin.replace("    for job in range(j0, j1):", "    for job in numba.prange(nb * nw):", 1)
    return twin.replace("Runs the jobs j0 <= b * nw + k < j1", "Runs every job on numba's threads", 1)


def generate(disc, cache: bool, flags=None) -> str:
    """The kernel module's source for a diag DiscProgram (with kernel programs) and the
    region's ``flags`` (see ``normalise_flags``): delta bias and softplus are the prologue
    on the raw delta, the D skip and the silu gate the epilogue writing the final y; their
    derivatives (the activations' programs) are generated into the backward kernel.

    Specialisation: when the program's gain is just dt (Euler for B, as in
    ``mamba``), d gain = d dt and the sums over the state are factored out of
    the inner loop (``du = dt * sum_n h B_n``); otherwise the gain and its
    derivatives are evaluated per element."""
    bias, softplus, d_skip, gate = normalise_flags(flags)
    kern, grad = disc.kernel, disc.kernel_grad
    names = {"A_re": "A_re", "dt": "delta"}
    pro, out = kern.inline("numba", names, prefix="_p")
    a, gain = f"({out['Abar']})", f"({out['gain']})"
    gain_is_dt = kern.alias("gain") == "dt"
    gpro, gout = grad.inline("numba", dict(names, Abar="Abar"), prefix="_q")
    adjoint = gpro + ([] if gain_is_dt else pro + [f"gv = {gain}"])  # the gain again, unless it is dt
    terms = []
    if not gain_is_dt:
        terms.append("qg = hv * bn * ut[j]")
    da = [_scaled("qa", gout, grad, "dAbar_dA")] + ([] if gain_is_dt else [_scaled("qg", gout, grad, "dgain_dA")])
    dd = [_scaled("qa", gout, grad, "dAbar_ddt")] + ([] if gain_is_dt else [_scaled("qg", gout, grad, "dgain_ddt")])
    da, dd = [t for t in da if t], [t for t in dd if t]
    if da:
        terms.append(f"dAn[j] += {' + '.join(da)}")
    if dd:
        terms.append(f"s_a[j] += {' + '.join(dd)}")
    channel = ["for j in range(W):  # gain = dt: du = dt * sum_n h B_n, ddt += u * sum_n h B_n",
               "    s_a[j] += ut[j] * s_b[j]", "    s_b[j] *= dl[j]"] if gain_is_dt else []
    channel += _epilogue_channel(bias, softplus, d_skip)
    fwd = _FWD.format(prologue=_indent(pro, 20), a=a, gain=gain,
                      delta_fwd=_indent(_delta_lines(bias, softplus, False), 16),
                      epilogue_fwd=_indent(_epilogue(d_skip, gate), 12))
    bwd = _BWD.format(prologue=_indent(pro, 24), a=a, gain=gain, grad_prologue=_indent(adjoint, 24),
                      delta_fwd_b=_indent(_delta_lines(bias, softplus, False), 20),
                      delta_bwd=_indent(_delta_lines(bias, softplus, True), 20),
                      epilogue_bwd=_indent(_epilogue_grad(d_skip, gate), 16),
                      gain_b="dl[j]" if gain_is_dt else "gv", gain_u="" if gain_is_dt else " * gv",
                      grad_terms=_indent(terms, 24), channel_terms=_indent(channel, 16))
    header = _HEADER.format(method=disc.method, exp_module=__name__, cache=bool(cache), version=_VERSION,
                            copy2=_COPY2,
                            flags=", ".join(f"{k}={v}" for k, v in zip(FLAGS, (bias, softplus, d_skip, gate))))
    return header + fwd + bwd + _parallel_twin(fwd) + _parallel_twin(bwd)


# --------------------------------------------------------------------------- #
# the time-invariant complex diagonal recurrence (ssm kinds diag / s5)
# --------------------------------------------------------------------------- #
_LTI_HEADER = '''\
"""seqc: generated CPU kernels of the constant complex diagonal recurrence
(complex_in={complex_in}, complex_out={complex_out}).  Regenerate, do not edit."""
import numba
import numpy as np

_CACHE = {cache}
{copy2}# runtime version: {version}
'''

_LTI_FWD = """
@numba.njit(nogil=True, fastmath={{"contract"}}, cache=_CACHE)
def fwd(j0, j1, ur, ui, ar, ai, br, bi, cr, ci, lens, chunk, yr, yi, ckpt, xr, xi, fr, fi):
    \"""Runs the jobs j0 <= b * nw + k < j1: x_t = a x_(t-1) + Bbar u_t, w_t = sum_s C_s x_t,s
    per (channel, mode), complex numbers as (re, im) arrays.  u, w: (b, L, nw, W); a, Bbar, C:
    (nw, S, W); x (b, nw, S, W) holds the initial state on entry and the state after L steps
    on exit; f gets the state after lens[b] steps; ckpt (b, nchunks, 2, nw, S, W) the state
    before each chunk.\"""
    nb, L, nw, W = ur.shape
    S = ar.shape[1]
    for job in range(j0, j1):
        b, k = job // nw, job % nw
        xrk, xik, ark, aik, brk, bik, crk, cik = xr[b, k], xi[b, k], ar[k], ai[k], br[k], bi[k], cr[k], ci[k]
        n_len = lens[b]
        if n_len == 0:
            _copy2(fr[b, k], xrk)
            _copy2(fi[b, k], xik)
        for t in range(L):
            if t % chunk == 0:
                _copy2(ckpt[b, t // chunk, 0, k], xrk)
                _copy2(ckpt[b, t // chunk, 1, k], xik)
            urt, yrt = ur[b, t, k], yr[b, t, k]
{fwd_head}
            for j in range(W):
                yrt[j] = 0
{fwd_zero}
            for n in range(S):
                xrn, xin, arn, ain, brn, bin_, crn, cin = xrk[n], xik[n], ark[n], aik[n], brk[n], bik[n], crk[n], cik[n]
                for j in range(W):
                    pr = xrn[j]
                    pi = xin[j]
                    vr = arn[j] * pr - ain[j] * pi + brn[j] * urt[j]{fwd_in_r}
                    vi = arn[j] * pi + ain[j] * pr + bin_[j] * urt[j]{fwd_in_i}
                    xrn[j] = vr
                    xin[j] = vi
                    yrt[j] += crn[j] * vr - cin[j] * vi
{fwd_out_i}
            if t == n_len - 1:
                _copy2(fr[b, k], xrk)
                _copy2(fi[b, k], xik)
"""

_LTI_BWD = """
@numba.njit(nogil=True, fastmath={{"contract", "reassoc"}}, cache=_CACHE)
def bwd(j0, j1, ur, ui, ar, ai, br, bi, cr, ci, lens, ckpt, gyr, gyi, gxr, gxi, chunk, hr, hi, xs,
        dur, dui, dar, dai, dbr, dbi, dcr, dci):
    \"""Adjoint of fwd (same layouts; gradients of a complex z as dL/dRe z + i dL/dIm z).  Runs
    G_t = conj(a) G_(t+1) + conj(C) gw_t (+ gx, the final state's gradient, at t = lens[b] - 1)
    backwards over each chunk's states, recomputed from its checkpoint into xs[job]
    (chunk + 1, 2, S, W); h (b, nw, S, W) starts at zero and leaves as the initial state's
    gradient; da, dBbar, dC (b, nw, S, W) start at zero and get per-batch partials.\"""
    nb, L, nw, W = ur.shape
    S = ar.shape[1]
    for job in range(j0, j1):
        b, k = job // nw, job % nw
        hrk, hik, ark, aik, brk, bik, crk, cik = hr[b, k], hi[b, k], ar[k], ai[k], br[k], bi[k], cr[k], ci[k]
        darb, daib, dbrb, dbib, dcrb, dcib = dar[b, k], dai[b, k], dbr[b, k], dbi[b, k], dcr[b, k], dci[b, k]
        x = xs[job]
        n_len = lens[b]
        for c in range(ckpt.shape[1] - 1, -1, -1):
            t0 = c * chunk
            t1 = min(L, t0 + chunk)
            _copy2(x[0, 0], ckpt[b, c, 0, k])
            _copy2(x[0, 1], ckpt[b, c, 1, k])
            for i in range(t1 - t0):  # recompute this chunk's states
                urt = ur[b, t0 + i, k]
{bwd_head_rec}
                for n in range(S):
                    arn, ain, brn, bin_ = ark[n], aik[n], brk[n], bik[n]
                    pr, pi, xrn, xin = x[i, 0, n], x[i, 1, n], x[i + 1, 0, n], x[i + 1, 1, n]
                    for j in range(W):
                        xrn[j] = arn[j] * pr[j] - ain[j] * pi[j] + brn[j] * urt[j]{fwd_in_r}
                        xin[j] = arn[j] * pi[j] + ain[j] * pr[j] + bin_[j] * urt[j]{fwd_in_i}
            for i in range(t1 - t0 - 1, -1, -1):  # the adjoint, G = dL/dx_t
                t = t0 + i
                urt, gyrt, durt = ur[b, t, k], gyr[b, t, k], dur[b, t, k]
{bwd_head}
                if t == n_len - 1:
                    for n in range(S):
                        for j in range(W):
                            hrk[n, j] += gxr[b, k, n, j]
                            hik[n, j] += gxi[b, k, n, j]
                for j in range(W):
                    durt[j] = 0
{bwd_zero}
                for n in range(S):
                    arn, ain, brn, bin_, crn, cin = ark[n], aik[n], brk[n], bik[n], crk[n], cik[n]
                    hrn, hin, pr, pi, xrn, xin = hrk[n], hik[n], x[i, 0, n], x[i, 1, n], x[i + 1, 0, n], x[i + 1, 1, n]
                    dan, dain, dbn, dbin, dcn, dcin = darb[n], daib[n], dbrb[n], dbib[n], dcrb[n], dcib[n]
                    for j in range(W):
                        g = gyrt[j]
                        Gr = hrn[j] + crn[j] * g{bwd_g_r}
                        Gi = hin[j] - cin[j] * g{bwd_g_i}
                        dcn[j] += g * xrn[j]{bwd_dc_r}
                        dcin[j] -= g * xin[j]{bwd_dc_i}
                        u = urt[j]
                        durt[j] += brn[j] * Gr + bin_[j] * Gi
{bwd_du_i}
                        dbn[j] += Gr * u{bwd_db_r}
                        dbin[j] += Gi * u{bwd_db_i}
                        dan[j] += Gr * pr[j] + Gi * pi[j]
                        dain[j] += Gi * pr[j] - Gr * pi[j]
                        hrn[j] = arn[j] * Gr + ain[j] * Gi
                        hin[j] = arn[j] * Gi - ain[j] * Gr
        if n_len == 0:
            for n in range(S):
                for j in range(W):
                    hrk[n, j] += gxr[b, k, n, j]
                    hik[n, j] += gxi[b, k, n, j]
"""


def generate_lti(complex_in: bool, complex_out: bool, cache: bool) -> str:
    """The kernel module's source for the constant complex diagonal recurrence

        x_t = a x_(t-1) + Bbar u_t,   w_t = sum_s C_s x_t,s     (per channel; a, Bbar, C per (channel, mode))

    with a real input u (``complex_in`` False: S4D, Bbar u is formed in the kernel) or a complex one
    (S5 after its input projection), and the real part of w only (``complex_out`` False: S4D reads
    2 Re w) or all of it.  The discretization is not here: a and Bbar are constants the layer
    computes once per call from its (differentiable) parameters."""
    sub = {
        "fwd_in_r": " - bin_[j] * uit[j]" if complex_in else "",
        "fwd_in_i": " + brn[j] * uit[j]" if complex_in else "",
        "fwd_out_i": _indent(["yit[j] += crn[j] * vi + cin[j] * vr"], 20) if complex_out else "",
        "bwd_head_rec": _indent(["uit = ui[b, t0 + i, k]"], 16) if complex_in else "",
        "bwd_head": _indent((["uit, duit = ui[b, t, k], dui[b, t, k]"] if complex_in else []) +
                            (["gyit = gyi[b, t, k]"] if complex_out else []), 16),
        "bwd_zero": _indent(["    duit[j] = 0"], 16) if complex_in else "",
        "bwd_g_r": " + cin[j] * gyit[j]" if complex_out else "",
        "bwd_g_i": " + crn[j] * gyit[j]" if complex_out else "",
        "bwd_dc_r": " + gyit[j] * xin[j]" if complex_out else "",
        "bwd_dc_i": " - gyit[j] * xrn[j]" if complex_out else "",
        "bwd_du_i": _indent(["duit[j] += brn[j] * Gi - bin_[j] * Gr"], 24) if complex_in else "",
        "bwd_db_r": " + Gi * uit[j]" if complex_in else "",
        "bwd_db_i": " - Gr * uit[j]" if complex_in else "",
    }
    head = ["yit = yi[b, t, k]"] if complex_out else []
    sub["fwd_head"] = _indent((["uit = ui[b, t, k]"] if complex_in else []) + head, 12)
    sub["fwd_zero"] = _indent(["    yit[j] = 0"], 12) if complex_out else ""
    fwd = _LTI_FWD.format(**{k: v for k, v in sub.items() if "{" + k + "}" in _LTI_FWD})
    bwd = _LTI_BWD.format(**{k: v for k, v in sub.items() if "{" + k + "}" in _LTI_BWD})
    header = _LTI_HEADER.format(complex_in=bool(complex_in), complex_out=bool(complex_out), cache=bool(cache),
                                version=_VERSION, copy2=_COPY2)
    body = header + fwd + bwd + _parallel_twin(fwd) + _parallel_twin(bwd)
    return "\n".join(ln for ln in body.split("\n") if ln.strip() != "pass") + "\n"


_VERSION = hashlib.sha256((inspect.getsource(_register_numba_exp) + _FWD + _BWD + _LTI_FWD + _LTI_BWD).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- #
# cache and loading
# --------------------------------------------------------------------------- #
def cache_dir() -> str:
    """seqc's cache directory (``seqc.cache.cache_root``)."""
    from seqc.cache import cache_root
    return cache_root()


def _write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".py")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _index_files(folder: str, stem: str):
    cache = os.path.join(folder, "__pycache__")
    if not os.path.isdir(cache):
        return []
    return [os.path.join(cache, f) for f in os.listdir(cache) if f.startswith(stem + ".") and f.endswith(".nbi")]


def _drop_broken_indexes(folder: str, stem: str) -> int:
    """Remove numba index files that do not unpickle (a run killed mid-write); count the good ones."""
    good = 0
    for path in _index_files(folder, stem):
        try:
            with open(path, "rb") as f:
                pickle.load(f)
                pickle.loads(f.read())
            good += 1
        except Exception:
            os.unlink(path)       # numba rewrites it on the next compile
    return good


def _announce() -> None:
    if not _STATE.get("announced"):
        _STATE["announced"] = True
        print("seqc: compiling CPU kernels (once) ...", file=sys.stderr, flush=True)


def _from_file(source: str, stem: str):
    folder = cache_dir()
    path = os.path.join(folder, stem + ".py")
    if not os.path.exists(path):
        _write_atomic(path, source)
    elif open(path).read() != source:       # a hash collision or a damaged file: rewrite
        _write_atomic(path, source)
    if not _drop_broken_indexes(folder, stem):
        _announce()
    name = f"seqc_cpu_{stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # numba's cache re-imports the module by name when it loads
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module.fwd, module.bwd, module.fwd_parallel, module.bwd_parallel


def _in_memory(build, label):
    """Compile ``build(cache=False)`` (a kernel module's source) without the disk cache."""
    _announce()
    namespace = {"__name__": "seqc_cpu_kernels_in_memory"}
    exec(compile(build(cache=False), f"<seqc cpu kernels {label}>", "exec"), namespace)
    return tuple(namespace[n] for n in ("fwd", "bwd", "fwd_parallel", "bwd_parallel"))


def _load(key, build, label):
    """The guarded (fwd, bwd) pair of the module ``build(cache=...)`` generates, cached under ``key``."""
    with _LOCK:
        found = _STATE["kernels"].get(key)
        if found is None:
            source = build(cache=True)
            stem = "kernels_" + hashlib.sha256(source.encode()).hexdigest()[:20]
            try:
                found = _from_file(source, stem)
            except Exception:      # read-only or broken cache: compile in memory instead
                stem, found = None, _in_memory(build, label)
            found = _STATE["kernels"][key] = _Guarded(found, build, label, source, stem)
        return found


def kernels(disc, flags=None):
    """(fwd, bwd) numba kernels for the diag DiscProgram ``disc`` and the fusion flags
    (``normalise_flags``); None without numba or when the program has no kernel form."""
    if disc.kernel is None or numba_module() is None:
        return None
    flags = normalise_flags(flags)
    key = (disc.kernel.digest, disc.kernel_grad.digest, flags)
    return _load(key, lambda cache: generate(disc, cache=cache, flags=flags), disc.method)


def lti_kernels(complex_in: bool, complex_out: bool):
    """(fwd, bwd) numba kernels of the constant complex diagonal recurrence (``generate_lti``);
    None without numba."""
    if numba_module() is None:
        return None
    key = ("lti", bool(complex_in), bool(complex_out))
    return _load(key, lambda cache: generate_lti(complex_in, complex_out, cache=cache), "lti")


def _rebuild(build, label, source, stem):
    """After a cached kernel failed to load: drop the stem's numba cache and compile again
    (in memory if even that fails)."""
    if stem is not None:
        try:
            for path in _index_files(cache_dir(), stem):
                os.unlink(path)
            return _from_file(source, stem)
        except Exception:
            pass
    return _in_memory(build, label)


PARALLEL_MIN_WORK = 1 << 20
"""Calls updating fewer state elements (batch x length x channels x state) run serially:
a millisecond or less of work, where the parallel kernels would save little and cost a
process their compilation (the cold start of a small model)."""


class _Guarded:
    """The kernels of one module: serial ``fwd``/``bwd`` over a range of jobs and their
    ``parallel=True`` twins (``fwd_parallel``/``bwd_parallel``, compiled only when first
    used).  At one thread of torch's count, one job, or a small call (``PARALLEL_MIN_WORK``)
    the serial kernel runs in the calling thread; otherwise the parallel one on numba's
    threads.  If a cached kernel fails to load on its first call (a damaged numba cache),
    the module is rebuilt and the call retried once."""

    def __init__(self, kernels, build, label, source, stem):
        self.kernels, self.build, self.label = kernels, build, label
        self.source, self.stem, self.tried = source, stem, set()

    def _call(self, which, args):
        threads = _torch_threads()
        jobs = args[0].shape[0] * args[0].shape[2]
        work = args[0].size * args[2].shape[1]         # state elements updated: b L D N
        if threads == 1 or jobs == 1 or work < PARALLEL_MIN_WORK:
            return self._run(which, (0, jobs) + tuple(args))
        numba = _STATE["numba"]
        guard = _launch_guard()
        if guard is None:
            return self._launch(numba, which + 2, args, threads)
        with guard:
            try:
                return self._launch(numba, which + 2, args, threads)
            finally:
                _note_threading_layer(numba)

    def _launch(self, numba, which, args, threads):
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        try:
            return self._run(which, args)
        finally:
            _restore_torch_threads(threads)

    def _run(self, which, args):
        key = (which, args[-1].dtype)
        if key in self.tried:
            return self.kernels[which](*args)
        try:
            return self.kernels[which](*args)
        except (pickle.UnpicklingError, EOFError, OSError, ImportError, AttributeError):
            with _LOCK:
                self.kernels = _rebuild(self.build, self.label, self.source, self.stem)
                self.stem = None
            return self.kernels[which](*args)
        finally:
            self.tried.add(key)

    def fwd(self, *args):
        return self._call(0, args)

    def bwd(self, *args):
        return self._call(1, args)


def _launch_guard():
    """The lock to hold around a parallel kernel call, or None when calls may run concurrently.

    numba's ``workqueue`` threading layer is not thread-safe: two Python threads
    launching parallel kernels at once abort the process (SIGABRT).  numba picks its
    layer at the first parallel launch (tbb, else omp, else workqueue, unless
    ``NUMBA_THREADING_LAYER`` says otherwise; seqc leaves that setting alone), so calls
    are serialised until the layer is known, and for good when it is workqueue."""
    layer = _STATE.get("threading_layer")
    return None if layer is not None and layer != "workqueue" else _LAUNCH_LOCK


def _note_threading_layer(numba) -> None:
    if _STATE.get("threading_layer") is None:
        try:
            _STATE["threading_layer"] = numba.threading_layer()
        except ValueError:          # no parallel launch has happened yet
            pass


def _torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def _restore_torch_threads(n: int) -> None:
    """numba's OpenMP layer sets the OpenMP thread count when its pool starts, which is
    torch's too: put torch's back if a kernel call changed it."""
    import torch
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
