"""Generated numba kernels for the diagonal linear recurrence on CPU.

Owns the kernel *template* and its specialisation, the on-disk kernel cache,
numba's set-up (the vectorisable ``_exp``), and thread-count hygiene.

The kernels run, per (batch, block of channels) job and per time step t,

    prologue   a_t, b_t from the discretization program     (printed, not written here)
    core       x_t = a_t * x_{t-1} + b_t                      (the generic recurrence)
    epilogue   y_t = <C_t, x_t>                               (contraction)

and the backward kernel recomputes each chunk of states from its checkpoint,
runs the adjoint ``h_{t-1} = a_t h_t`` and differentiates the prologue with the
printed *derivative* program (d Abar, d gain by d A, d dt, derived with sympy
at compile time).  Nothing in this file spells a discretization: the
prologue's statements come from ``DiscProgram.kernel`` / ``kernel_grad``
printed for the ``numba`` target, where ``exp`` is ``_exp``.

Kernels are specialised by ``flags`` (a dict): ``disc`` (the program),
``gain_per_channel`` (the B gain does not depend on A, so sums over the state
can be factored).  Softplus, bias, D skip and gate stay torch ops around the
kernels (see ``scan.kernel_flags``).

Cache: the generated module is written (atomically: temp file + ``os.replace``)
to ``$SEQC_CACHE_DIR``, else ``$XDG_CACHE_HOME/seqc``, else ``~/.cache/seqc``,
as ``kernels_<hash of source>.py`` and imported from there, so numba's
``cache=True`` keeps the machine code beside it.  A directory that cannot be
written, or a module that fails to load, falls back to compiling in memory;
numba index files that do not unpickle (a truncated write) are removed first.
The first compilation with a cold cache prints one line on stderr.
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
_STATE: dict = {}           # "numba": module or None, "kernels": {key: (fwd, bwd)}, "announced": bool


def _exp(x):
    """exp; inside the kernels, the numba overload registered by ``_setup``."""
    return math.exp(x)


def _register_numba_exp(numba):
    """Overload ``_exp`` for numba: float32 Cephes expf and float64 degree-13
    Taylor, both after Cody-Waite reduction, 2**k built from its bits.  Both
    are accurate to about 1 ulp; arguments are clamped to the normal range
    (exp(-1000) gives 3e-308, not 0), NaN propagates.  (libm's exp would keep
    every loop scalar; compiled without fast-math so the reduction stays exact.)"""
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
_HEADER = '''\
"""seqc: generated CPU kernels of the diagonal linear recurrence ({method}).
Prologue/epilogue printed from the discretization's scalar programs; regenerate, do not edit."""
import math

import numba
import numpy as np

from {exp_module} import _exp

_CACHE = {cache}
# runtime version: {version}
'''

_FWD = '''
@numba.njit(parallel=True, fastmath={{"contract"}}, cache=_CACHE)
def fwd(u, dt, A, B, C, chunk, y, ckpt, x):
    """u, dt, y: (b, L, nw, W); A: (nw, N, W); B, C: (b, L, N); x (b, nw, N, W) holds the
    initial state on entry and the final state on exit; ckpt (b, nchunks, nw, N, W) gets the
    state before each chunk."""
    nb, L, nw, W = u.shape
    N = A.shape[1]
    for job in numba.prange(nb * nw):
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
                    A_re = An[j]
                    delta = dtt[j]
{prologue}
                    v = {a} * xn[j] + {gain} * ut[j] * bn    # core: x_t = a_t x_(t-1) + b_t
                    xn[j] = v
                    yt[j] += cn * v                       # epilogue: y_t = <C_t, x_t>
'''

_BWD = '''
@numba.njit(parallel=True, fastmath={{"contract", "reassoc"}}, cache=_CACHE)
def bwd(u, dt, A, B, C, ckpt, gy, chunk, h, xs, als, du, ddt, dA, dB, dC):
    """Adjoint of fwd (same layouts).  h (b, nw, N, W) enters as the final-state gradient and
    leaves as the initial-state gradient; dA (b, nw, N, W) starts at zero; job j owns the
    workspaces xs[j] (chunk+1, N, W) and als[j] (chunk, N, W) and writes its block's share of
    dB and dC into dB[b, k], dC[b, k] (L, N)."""
    nb, L, nw, W = u.shape
    N = A.shape[1]
    for job in numba.prange(nb * nw):
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
                        A_re = An[j]
                        delta = dtt[j]
{prologue}
                        an[j] = {a}
                        xn[j] = an[j] * xp[j] + {gain} * ut[j] * bn
            for i in range(t1 - t0 - 1, -1, -1):  # adjoint recurrence, h = dL/dx_t
                t = t0 + i
                ut, dtt, g = u[b, t, k], dt[b, t, k], gy[b, t, k]
                s_b, s_a = du[b, t, k], ddt[b, t, k]
                s_b[:] = 0
                s_a[:] = 0
                for n in range(N):
                    bn, cn = B[b, t, n], C[b, t, n]
                    hn, xn, xp, an, dAn, An = hk[n], x[i + 1, n], x[i, n], a[i, n], dAk[n], Ak[n]
                    sum_b = zero
                    sum_c = zero
                    for j in range(W):
                        A_re = An[j]
                        delta = dtt[j]
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
'''


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


def generate(disc, cache: bool) -> str:
    """The kernel module's source for a diag DiscProgram (with kernel programs).

    Specialisation: when the program's gain is just dt (Euler for B, as in
    ``mamba``), d gain = d dt and the sums over the state are factored out of
    the inner loop (``du = dt * sum_n h B_n``); otherwise the gain and its
    derivatives are evaluated per element."""
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
               "    s_a[j] += ut[j] * s_b[j]", "    s_b[j] *= dtt[j]"] if gain_is_dt else []
    fwd = _FWD.format(prologue=_indent(pro, 20), a=a, gain=gain)
    bwd = _BWD.format(prologue=_indent(pro, 24), a=a, gain=gain, grad_prologue=_indent(adjoint, 24),
                      gain_b="delta" if gain_is_dt else "gv", gain_u="" if gain_is_dt else " * gv",
                      grad_terms=_indent(terms, 24), channel_terms=_indent(channel, 16))
    header = _HEADER.format(method=disc.method, exp_module=__name__, cache=bool(cache), version=_VERSION)
    return header + fwd + bwd


_VERSION = hashlib.sha256((inspect.getsource(_register_numba_exp) + _FWD + _BWD).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- #
# cache and loading
# --------------------------------------------------------------------------- #
def cache_dir() -> str:
    """$SEQC_CACHE_DIR, else $XDG_CACHE_HOME/seqc, else ~/.cache/seqc."""
    if os.environ.get("SEQC_CACHE_DIR"):
        return os.environ["SEQC_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "seqc")


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
    return module.fwd, module.bwd


def _in_memory(disc):
    _announce()
    source = generate(disc, cache=False)
    namespace = {"__name__": "seqc_cpu_kernels_in_memory"}
    exec(compile(source, f"<seqc cpu kernels {disc.method}>", "exec"), namespace)
    return namespace["fwd"], namespace["bwd"]


def kernels(disc):
    """(fwd, bwd) numba kernels for the diag DiscProgram ``disc``; None without numba or
    when the program has no kernel form."""
    if disc.kernel is None or numba_module() is None:
        return None
    key = (disc.kernel.digest, disc.kernel_grad.digest)
    with _LOCK:
        found = _STATE["kernels"].get(key)
        if found is None:
            source = generate(disc, cache=True)
            stem = "kernels_" + hashlib.sha256(source.encode()).hexdigest()[:20]
            try:
                found = _from_file(source, stem)
            except Exception:      # read-only or broken cache: compile in memory instead
                stem, found = None, _in_memory(disc)
            found = _STATE["kernels"][key] = _Guarded(found, disc, source, stem)
        return found


def _rebuild(disc, source, stem):
    """After a cached kernel failed to load: drop the stem's numba cache and compile again
    (in memory if even that fails)."""
    if stem is not None:
        try:
            for path in _index_files(cache_dir(), stem):
                os.unlink(path)
            return _from_file(source, stem)
        except Exception:
            pass
    return _in_memory(disc)


class _Guarded:
    """The kernel pair; if a cached kernel fails to load on its first call (a damaged numba
    cache), the pair is rebuilt and the call retried once."""

    def __init__(self, pair, disc, source, stem):
        self.pair, self.disc, self.source, self.stem, self.tried = pair, disc, source, stem, set()

    def _call(self, which, args):
        numba = _STATE["numba"]
        threads = _torch_threads()
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        try:
            key = (which, args[0].dtype)
            if key in self.tried:
                return self.pair[which](*args)
            try:
                return self.pair[which](*args)
            except (pickle.UnpicklingError, EOFError, OSError, ImportError, AttributeError):
                with _LOCK:
                    self.pair = _rebuild(self.disc, self.source, self.stem)
                    self.stem = None
                return self.pair[which](*args)
            finally:
                self.tried.add(key)
        finally:
            _restore_torch_threads(threads)

    def fwd(self, *args):
        return self._call(0, args)

    def bwd(self, *args):
        return self._call(1, args)


def _torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def _restore_torch_threads(n: int) -> None:
    """numba's OpenMP layer sets the OpenMP thread count when its pool starts, which is
    torch's too: put torch's back if a kernel call changed it."""
    import torch
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
