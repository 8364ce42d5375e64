"""Discretization of continuous linear systems: one sympy derivation, lowered by code printers.

Owns the map from a continuous system ``x' = A x + B u`` and a step ``dt`` to
the discrete ``x[k+1] = Abar x[k] + Bbar u[k]`` for the methods ``zoh``,
``bilinear``, ``euler``, ``backward_euler`` and ``mamba`` (ZOH for A, Euler
for B).  Each method is *derived* once with sympy from its definition (the
variation-of-constants integral for ZOH, the generalised bilinear transform
for the others), rewritten to a numerically safe form (``phi1(z) = expm1(z)/z``
instead of ``(exp(z) - 1)/z``), and lowered by sympy's code printers into
Python source for NumPy or torch, which is ``exec``-ed.  The backends therefore
run the derived expressions, never hand-written copies.

* ``structure="diag"``: A is a vector of eigenvalues; the expressions are
  elementwise and broadcast over A, B, dt (real or complex).
* ``structure="dense"``: the same scalar derivation read as matrix functions of
  ``M = dt*A``: ``Abar = f(M)``, ``Bbar = g(M) dt B``; rational ``f, g`` become
  linear solves, ``exp`` the matrix exponential and ``phi1`` the top-right
  block of ``exp([[M, dt B], [0, 0]])``.

Public: ``discretizer``, ``derivation``, ``raw_derivation``, ``describe``,
``source``, ``override``, ``discretize`` (the numeric NumPy entry point:
``discretize(A, B, dt, method)`` -> ``(Abar, Bbar)``, same conventions as
``scipy.signal.cont2discrete``).
"""
from __future__ import annotations

import contextlib
import functools
import numbers

import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import expm1
from sympy.printing.numpy import NumPyPrinter

from .errors import SeqcError, did_you_mean

METHODS = ("zoh", "bilinear", "euler", "backward_euler", "mamba")
STRUCTURES = ("diag", "dense")
BACKENDS = ("numpy", "torch")
# scipy.signal.cont2discrete's names for the same schemes.
ALIASES = {"forward_diff": "euler", "backward_diff": "backward_euler", "tustin": "bilinear"}
# Generalised bilinear transform weight of each one-step scheme (scipy's gbt alpha).
GBT_ALPHA = {"euler": sp.S.Zero, "bilinear": sp.S.Half, "backward_euler": sp.S.One}

# Below this |z| phi1 uses its Taylor series (error |z|^4/120 < 1e-18 there).
PHI1_TAYLOR_RADIUS = sp.Float(1e-4)

A = sp.Symbol("A", complex=True)
B = sp.Symbol("B", complex=True)
dt = sp.Symbol("dt", positive=True)
_z = sp.Symbol("z", complex=True)  # dt*A, argument of the dense matrix functions


class phi1(sp.Function):
    """phi1(z) = (exp(z) - 1)/z, with phi1(0) = 1: the ZOH input integral, divided by dt."""

    nargs = 1

    @classmethod
    def eval(cls, z):
        if z.is_zero:
            return sp.S.One
        return None

    def _eval_rewrite_as_exp(self, z, **kwargs):
        return (sp.exp(z) - 1) / z

    def fdiff(self, argindex=1):
        z = self.args[0]
        return (sp.exp(z) - phi1(z)) / z


# --------------------------------------------------------------------------
# derivation
# --------------------------------------------------------------------------

def _check(kind: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise SeqcError(f"unknown discretization {kind} {value!r}{hint}; "
                        f"expected one of {', '.join(choices)}")
    return value


def _method(method) -> str:
    if isinstance(method, str):
        method = ALIASES.get(method, method)
    return _check("method", method, METHODS)


def _derive_gbt(alpha):
    """One step of x' = A x + B u with the implicit weight alpha, solved for x[k+1]."""
    x0, x1, u = sp.symbols("x0 x1 u")
    step = sp.Eq(x1, x0 + dt * (A * ((1 - alpha) * x0 + alpha * x1) + B * u))
    x_next = sp.solve(step, x1)[0]
    return _positive_constant_terms(sp.diff(x_next, x0)), _positive_constant_terms(sp.diff(x_next, u))


def _positive_constant_terms(expr):
    """(A dt + 2)/(2 - A dt) rather than -(A dt + 2)/(A dt - 2): the textbook reading."""
    num, den = sp.fraction(sp.factor(expr))
    if den.subs(A, 0).is_negative:
        num, den = -num, sp.expand(-den)
    return num / den


def _derive_zoh():
    """Exact solution over [0, dt] with u held: exp(A dt), integral_0^dt exp(A (dt - s)) ds B."""
    s = sp.Symbol("s", positive=True)
    return sp.exp(A * dt), sp.integrate(sp.exp(A * (dt - s)), (s, 0, dt)) * B


def _generic_branch(expr):
    """(the branch valid for A != 0, all branches): sympy's integral splits on A == 0."""
    folded = sp.piecewise_fold(expr)
    pieces = folded.args if isinstance(folded, sp.Piecewise) else ((folded, sp.true),)
    return pieces[0][0], pieces


def _stabilise(expr):
    """Where the expression divides by A, rewrite exp(w) as 1 + w*phi1(w).

    This cancels the division, so ZOH's (exp(A dt) - 1)/A becomes dt*phi1(A dt).

    The result must agree with every branch of the raw (Piecewise) expression,
    including the A == 0 one; that is checked here, so a wrong rewrite cannot
    reach a backend.
    """
    generic, pieces = _generic_branch(expr)
    if sp.fraction(sp.together(generic))[1].subs(A, 0) != 0:
        return generic  # no division by a vanishing A: already safe
    safe = sp.simplify(generic.replace(sp.exp, lambda w: 1 + w * phi1(w)))
    if sp.simplify(safe.rewrite(sp.exp) - generic) != 0:
        raise AssertionError(f"unsafe rewrite of {generic}: {safe}")
    for value, cond in pieces[1:]:
        if cond != sp.true and sp.simplify(safe.subs(A, 0) - value.subs(A, 0)) != 0:
            raise AssertionError(f"{safe} disagrees with the branch {value} where {cond}")
    return safe


@functools.lru_cache(maxsize=None)
def raw_derivation(method: str):
    """(Abar, Bbar) as derived from the method's definition, before the safe rewrite."""
    method = _method(method)
    if method == "zoh":
        return _derive_zoh()
    if method == "mamba":
        return raw_derivation("zoh")[0], raw_derivation("euler")[1]
    return _derive_gbt(GBT_ALPHA[method])


@functools.lru_cache(maxsize=None)
def _safe_derivation(method: str):
    return tuple(_stabilise(e) for e in raw_derivation(method))


_OVERRIDES: dict[tuple[str, str], tuple] = {}


def derivation(structure: str, method: str):
    """The sympy expressions (Abar, Bbar) in A, B, dt that the backends execute.

    For ``structure="dense"`` they are read as matrix functions of ``dt*A``.
    """
    key = (_check("structure", structure, STRUCTURES), _method(method))
    if key in _OVERRIDES:
        return _OVERRIDES[key]
    return _safe_derivation(key[1])


def describe(structure: str, method: str) -> str:
    """One line for IR dumps, e.g. ``Abar = exp(A*dt); Bbar = B*dt``."""
    abar, bbar = derivation(structure, method)
    text = f"Abar = {sp.sstr(abar)}; Bbar = {sp.sstr(bbar)}"
    if abar.has(phi1) or bbar.has(phi1):
        text += "; phi1(z) = expm1(z)/z"
    if structure == "dense":
        text += " (matrix functions of dt*A)"
    return text


@contextlib.contextmanager
def override(structure: str, method: str, Abar_expr, Bbar_expr):
    """Temporarily replace a derivation (tests); generated code is regenerated."""
    key = (_check("structure", structure, STRUCTURES), _method(method))
    previous = _OVERRIDES.get(key)
    _OVERRIDES[key] = (sp.sympify(Abar_expr), sp.sympify(Bbar_expr))
    _generated.cache_clear()
    try:
        yield
    finally:
        if previous is None:
            _OVERRIDES.pop(key, None)
        else:
            _OVERRIDES[key] = previous
        _generated.cache_clear()


# --------------------------------------------------------------------------
# lowering: printers
# --------------------------------------------------------------------------

def _phi1_safe(w):
    """phi1 as printable elementwise code: Taylor near 0, expm1(w)/w elsewhere.

    The denominator is shifted by 1 inside the Taylor disc so the unused branch
    stays finite (no 0/0, no NaN gradients through torch.where).
    """
    small = sp.Abs(w, evaluate=False) < PHI1_TAYLOR_RADIUS   # not dt*|A|: dt may be negative (raw delta)
    taylor = 1 + w / 2 + w**2 / 6 + w**3 / 24
    shifted = w + sp.Piecewise((1, small), (0, True))
    return sp.Piecewise((taylor, small), (expm1(w) / shifted, True))


@functools.lru_cache(maxsize=None)
def _torch_printer_class():
    """sympy's TorchPrinter plus the two functions the derivations need.

    Built on first use: importing sympy.printing.pytorch imports torch.
    """
    from sympy.printing.pytorch import TorchPrinter

    class _TorchPrinter(TorchPrinter):
        def _print_expm1(self, expr):
            return f"torch.expm1({self._print(expr.args[0])})"

        def _print_Piecewise(self, expr):
            *pieces, (last, cond) = expr.args
            if cond != sp.true:
                raise NotImplementedError("Piecewise without an otherwise branch")
            code = self._print(last)
            for value, c in reversed(pieces):
                code = f"torch.where({self._print(c)}, {self._print(value)}, {code})"
            return code

    return _TorchPrinter


_PRINTERS = {"numpy": lambda: NumPyPrinter, "torch": _torch_printer_class}


def _printer(backend):
    return _PRINTERS[backend]()({"fully_qualified_modules": True, "strict": True})


def _diag_source(method: str, backend: str) -> str:
    abar, bbar = derivation("diag", method)
    lowered = [e.replace(phi1, _phi1_safe) for e in (abar, bbar)]
    temps, (abar, bbar) = sp.cse(lowered, symbols=sp.numbered_symbols("t"))
    printer = _printer(backend)
    lines = [f"def discretize_diag_{method}(A, B, dt):"]
    if backend == "torch":
        lines.append("    A, B, dt = _tensors(A, B, dt)")
    lines += [f"    {name} = {printer.doprint(value)}" for name, value in temps]
    lines.append(f"    return {printer.doprint(abar)}, {printer.doprint(bbar)}")
    return "\n".join(lines) + "\n"


# dense: matrix functions of M = dt*A -------------------------------------------

def _as_function_of_z(expr, factor, what):
    """expr / factor with A -> z/dt; must then depend on z only."""
    g = sp.simplify((expr / factor).subs(A, _z / dt))
    if g.free_symbols - {_z}:
        raise SeqcError(f"cannot lower {what} = {expr} to a matrix function of dt*A")
    return g


def _scaled(c, operand: str, printer) -> str:
    if c == 1:
        return operand
    if c == -1:
        return f"-{operand}"
    return f"({printer.doprint(c)})*{operand}"


def _poly_times(poly: sp.Poly, operand: str, printer) -> str:
    """Code for p(M) @ operand in Horner form (operand "I" gives p(M) itself)."""
    leading, *rest = poly.all_coeffs()
    code = _scaled(leading, operand, printer)
    for c in rest:
        code = {"I": "M", "-I": "-M"}.get(code, f"M @ ({code})")
        if c.is_extended_negative:
            code += f" - {_scaled(-c, operand, printer)}"
        elif c != 0:
            code += f" + {_scaled(c, operand, printer)}"
    return code


def _matrix_function(g, rhs: str, printer, what) -> str:
    """Code for g(M) @ rhs, where rhs is "I" for g(M) itself."""
    if g == sp.exp(_z) and rhs == "I":
        return "expm(M)"
    if rhs != "I" and sp.simplify(g.rewrite(sp.exp) - (sp.exp(_z) - 1) / _z) == 0:
        return f"phi1_times(M, {rhs})"
    if g.is_rational_function(_z):
        num, den = (sp.Poly(p, _z) for p in sp.fraction(sp.cancel(g)))
        top = _poly_times(num, rhs, printer)
        if den.degree() > 0:
            return f"solve({_poly_times(den, 'I', printer)}, {top})"
        return top if den.as_expr() == 1 else f"({top}) / ({printer.doprint(den.as_expr())})"
    raise SeqcError(f"cannot lower {what} = {g} (in z = dt*A) to a matrix function")


def _dense_source(method: str, backend: str) -> str:
    abar, bbar = derivation("dense", method)
    printer = _printer(backend)
    f = _as_function_of_z(abar, 1, "Abar")
    g = _as_function_of_z(bbar, dt * B, "Bbar")
    return "\n".join([
        f"def discretize_dense_{method}(A, B, dt):",
        "    M, dtB, I = prepare(A, B, dt)",
        f"    Abar = {_matrix_function(f, 'I', printer, 'Abar')}",
        f"    Bbar = {_matrix_function(g, 'dtB', printer, 'Bbar')}",
        "    return finish(Abar, Bbar, M, dtB)",
    ]) + "\n"


# --------------------------------------------------------------------------
# backend runtime primitives (generic linear algebra the generated code calls)
# --------------------------------------------------------------------------

def _np_prepare(A, B, dt):
    """M = dt*A and dt*B (batched over dt's shape, one common dtype), and I."""
    A, B = np.asarray(A), np.asarray(B)
    dtype = np.result_type(A, B, dt, 0.0)  # a Python dt is weakly typed (NEP 50)
    scale = np.asarray(dt, dtype=dtype)[..., None, None]
    return scale * A, scale * B, np.eye(A.shape[-1], dtype=dtype)


def _np_phi1_times(M, X):
    """phi1(M) @ X as the top-right block of exp([[M, X], [0, 0]])."""
    from .expm import expm

    return _block_phi1(M, X, expm, np.zeros, np.concatenate, np.broadcast_shapes,
                       np.broadcast_to)


def _block_phi1(M, X, exp, zeros, cat, shapes, expand):
    """phi1(M) @ X = top-right block of exp([[M, X], [0, 0]]) (M, X of one dtype)."""
    n, k = M.shape[-1], X.shape[-1]
    batch = tuple(shapes(M.shape[:-2], X.shape[:-2]))
    M, X = expand(M, batch + M.shape[-2:]), expand(X, batch + X.shape[-2:])
    bottom = zeros(batch + (k, n + k), dtype=M.dtype)
    return exp(cat([cat([M, X], -1), bottom], -2))[..., :n, n:]


def _finish(Abar, Bbar, M, dtB, expand):
    batch = M.shape[:-2]
    return expand(Abar, batch + M.shape[-2:]), expand(Bbar, batch + dtB.shape[-2:])


def _numpy_namespace():
    from .expm import expm

    return {"numpy": np, "prepare": _np_prepare, "solve": np.linalg.solve, "expm": expm,
            "phi1_times": _np_phi1_times,
            "finish": lambda a, b, M, x: _finish(a, b, M, x, np.broadcast_to)}


def _torch_namespace():
    import torch

    def tensor(x):
        # Python numbers become 0-d float64/complex128: full precision, and 0-d
        # tensors do not promote float32 operands.
        if isinstance(x, torch.Tensor):
            return x
        if isinstance(x, numbers.Number):
            return torch.tensor(x, dtype=torch.complex128 if isinstance(x, complex) else torch.float64)
        return torch.as_tensor(x)

    def tensors(*xs):
        return [tensor(x) for x in xs]

    def prepare(A, B, dt):
        A, B, dt = tensors(A, B, dt)
        scale = dt if dt.ndim == 0 else dt[..., None, None]  # 0-d: weak in type promotion
        M, dtB = scale * A, scale * B
        dtype = torch.promote_types(M.dtype, dtB.dtype)
        if not (dtype.is_floating_point or dtype.is_complex):
            dtype = torch.get_default_dtype()
        eye = torch.eye(A.shape[-1], dtype=dtype, device=A.device)
        return M.to(dtype), dtB.to(dtype), eye

    def phi1_times(M, X):
        return _block_phi1(M, X, torch.linalg.matrix_exp, torch.zeros, torch.cat,
                           torch.broadcast_shapes, torch.Tensor.expand)

    def solve(a, b):
        # Expand b's batch dims first: torch reads b (N, K) against a (H, N, N), H == N,
        # as H vectors rather than one right-hand side matrix.
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        return torch.linalg.solve(a.expand(batch + a.shape[-2:]), b.expand(batch + b.shape[-2:]))

    return {"torch": torch, "_tensors": tensors, "prepare": prepare, "solve": solve, "expm": torch.linalg.matrix_exp,
            "phi1_times": phi1_times,
            "finish": lambda a, b, M, x: _finish(a, b, M, x, torch.Tensor.expand)}


_NAMESPACES = {"numpy": _numpy_namespace, "torch": _torch_namespace}
_SOURCES = {"diag": _diag_source, "dense": _dense_source}


def source(structure: str, method: str, backend: str) -> str:
    """The generated Python source of ``discretizer(structure, method, backend)``."""
    return _generated(_check("structure", structure, STRUCTURES), _method(method),
                      _check("backend", backend, BACKENDS))[0]


@functools.lru_cache(maxsize=None)
def _generated(structure: str, method: str, backend: str):
    code = _SOURCES[structure](method, backend)
    namespace = _NAMESPACES[backend]()
    exec(compile(code, f"<seqc discretize {structure} {method} {backend}>", "exec"), namespace)
    return code, namespace[f"discretize_{structure}_{method}"]


def discretizer(structure: str, method: str, backend: str):
    """A callable ``(A, B, dt) -> (Abar, Bbar)`` generated from the derivation.

    ``diag``: elementwise, broadcasting A, B, dt (arrays/tensors, real or
    complex; torch gradients flow through all three).  ``dense``: ``A (N, N)``,
    ``B (N, M)``, ``dt`` scalar or ``(H,)`` gives ``Abar (H, N, N)``,
    ``Bbar (H, N, M)`` (no H axis for a scalar dt).
    """
    return _generated(_check("structure", structure, STRUCTURES), _method(method),
                      _check("backend", backend, BACKENDS))[1]


# --------------------------------------------------------------------------
# numeric entry point
# --------------------------------------------------------------------------

def _numeric(name: str, x) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise SeqcError(f"{name} must be a numeric array: {exc}") from None
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise SeqcError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.inexact):
        arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise SeqcError(f"{name} must be finite")
    return arr


def _check_dt(step) -> float:
    arr = np.asarray(step)
    if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number) or arr.dtype == bool \
            or np.iscomplexobj(arr):
        raise SeqcError(f"dt must be a real scalar, got {step!r}")
    value = float(arr)
    if not (np.isfinite(value) and value > 0):
        raise SeqcError(f"dt must be a positive finite step, got {value}")
    return value


def _check_shapes(A: np.ndarray, Bm: np.ndarray) -> int:
    if A.ndim not in (1, 2) or (A.ndim == 2 and A.shape[0] != A.shape[1]):
        raise SeqcError(f"A must be a square (N, N) matrix or a diagonal (N,) vector, "
                        f"got shape {A.shape}")
    n = A.shape[0]
    if n == 0:
        raise SeqcError("A must have at least one state")
    if Bm.ndim not in (1, 2) or Bm.shape[0] != n:
        raise SeqcError(f"B must have shape ({n}, M) or ({n},) to match A of shape {A.shape}, "
                        f"got {Bm.shape}")
    return n


def discretize(A, B, dt, method: str = "zoh"):
    """(Abar, Bbar) as NumPy arrays; conventions of ``scipy.signal.cont2discrete``.

    ``A`` is dense ``(N, N)`` or a diagonal ``(N,)`` (then Abar is ``(N,)``);
    ``B`` is ``(N, M)`` or ``(N,)`` and Bbar has B's shape.  ``method`` is one
    of ``zoh``, ``bilinear``, ``euler``, ``backward_euler``, ``mamba``.
    """
    method = _method(method)
    A, Bm, step = _numeric("A", A), _numeric("B", B), _check_dt(dt)
    n = _check_shapes(A, Bm)
    with np.errstate(all="ignore"):
        try:
            if A.ndim == 1:
                column = A.reshape((n,) + (1,) * (Bm.ndim - 1))
                abar, bbar = discretizer("diag", method, "numpy")(column, Bm, step)
                abar = np.array(np.broadcast_to(abar, column.shape).reshape(n))
                bbar = np.array(np.broadcast_to(bbar, Bm.shape))
            else:
                abar, bbar = discretizer("dense", method, "numpy")(A, Bm.reshape(n, -1), step)
                abar, bbar = np.array(abar), np.array(bbar).reshape(Bm.shape)
        except np.linalg.LinAlgError:
            abar = None
    if abar is None or not (np.isfinite(abar).all() and np.isfinite(bbar).all()):
        raise SeqcError(f"the {method} discretization is singular for this A and dt "
                        f"(I - a*dt*A is not invertible, or the values overflow)")
    return abar, bbar
