"""Discretization of continuous linear systems: one sympy derivation, lowered to scalar programs.

Owns the map from a continuous system ``x' = A x + B u`` and a step ``dt`` to
the discrete ``x[k+1] = Abar x[k] + Bbar u[k]`` for the methods ``zoh``,
``bilinear``, ``euler``, ``backward_euler`` and ``mamba`` (ZOH for A, Euler
for B).  Three stages:

1. *derive* (sympy, compile time only): each method from its definition (the
   variation-of-constants integral for ZOH, the generalised bilinear transform
   for the others), rewritten to a numerically safe form (``phi1(z) =
   expm1(z)/z`` instead of ``(exp(z) - 1)/z``, checked against every branch of
   the raw form); the CPU kernels' derivatives d(Abar, Bbar/B)/d(A, dt) too.
2. *lower* to ``seqc.scalar.ScalarProgram``s (``program()`` returns a
   ``DiscProgram``): complex values split into re/im parts, ``phi1`` / ``phi2``
   as ``where(|z| < r, taylor, expm1(z)/shifted z)``, common subexpressions
   bound once.  The ``discretize`` pass stores it in ``node.meta["disc"]``.
3. *print and compile* (no sympy): ``DiscProgram.compile("numpy"|"torch")``
   executes the printed source once; the numba kernels paste the ``numba``
   printing into their template; other backends register their own printer.

* ``structure="diag"``: A is a vector of eigenvalues; the expressions are
  elementwise and broadcast over A, B, dt (real or complex).
* ``structure="dense"``: the same scalar derivation read as matrix functions of
  ``M = dt*A``: ``Abar = f(M)``, ``Bbar = g(M) dt B``; rational ``f, g`` become
  linear solves, ``exp`` the matrix exponential and ``phi1`` the top-right
  block of ``exp([[M, dt B], [0, 0]])`` (printed with sympy's printers when the
  program is built).

Public: ``program``, ``discretizer``, ``derivation``, ``raw_derivation``,
``describe``, ``source``, ``override``, ``discretize`` (the numeric NumPy entry
point, same conventions as ``scipy.signal.cont2discrete``).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import numbers
import threading
from dataclasses import dataclass

import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p
from sympy.printing.numpy import NumPyPrinter

from .errors import SeqcError, did_you_mean
from .scalar import ScalarProgram

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
        return phi1(z) - phi2(z)     # = (exp(z) - phi1(z))/z, without the division


class phi2(sp.Function):
    """phi2(z) = (phi1(z) - 1)/z = (exp(z) - 1 - z)/z**2, phi2(0) = 1/2 (derivatives of phi1)."""

    nargs = 1

    @classmethod
    def eval(cls, z):
        if z.is_zero:
            return sp.S.Half
        return None

    def _eval_rewrite_as_exp(self, z, **kwargs):
        return (sp.exp(z) - 1 - z) / z**2


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
    residual = x0 + dt * (A * ((1 - alpha) * x0 + alpha * x1) + B * u) - x1   # = 0, linear in x1
    slope = sp.diff(residual, x1)
    if slope.has(x1):
        raise AssertionError(f"the step {residual} = 0 is not linear in x[k+1]")
    x_next = -residual.subs(x1, 0) / slope     # solved directly: sympy.solve imports half of sympy
    return _positive_constant_terms(sp.diff(x_next, x0)), _positive_constant_terms(sp.diff(x_next, u))


def _positive_constant_terms(expr):
    """(A dt + 2)/(2 - A dt) rather than -(A dt + 2)/(A dt - 2): the textbook reading."""
    num, den = sp.fraction(sp.factor(expr))
    if den.subs(A, 0).is_negative:
        num, den = -num, sp.expand(-den)
    return num / den


def _zoh_state():
    """The exact state transition over [0, dt]: exp(A dt)."""
    return sp.exp(A * dt)


def _zoh_input():
    """The exact input gain over [0, dt] with u held: integral_0^dt exp(A (dt - s)) ds B."""
    s = sp.Symbol("s", positive=True)
    return sp.integrate(sp.exp(A * (dt - s)), (s, 0, dt)) * B


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
        return _zoh_state(), _zoh_input()
    if method == "mamba":      # ZOH's state transition, Euler's input gain (no integral to derive)
        return _zoh_state(), raw_derivation("euler")[1]
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
    _program.cache_clear()
    try:
        yield
    finally:
        if previous is None:
            _OVERRIDES.pop(key, None)
        else:
            _OVERRIDES[key] = previous
        _program.cache_clear()


# --------------------------------------------------------------------------
# lowering: sympy -> scalar programs (complex split into re/im, safe phi1)
# --------------------------------------------------------------------------

# Below this |z| phi2 uses its Taylor series (7 terms: error |z|^7/9! < 3e-20 there; outside,
# expm1(z) - z loses at most 2/|z| ulps = 200 ulps of phi2 ~ 2e-14 relative).
PHI2_TAYLOR_RADIUS = sp.Float(1e-2)

_RE = {name: sp.Symbol(name, real=True) for name in ("A_re", "A_im", "B_re", "B_im", "dt", "Abar", "x")}


def _cmul(p, q):
    (a, b), (c, d) = p, q
    return (a * c - b * d, a * d + b * c)


def _cinv(p):
    a, b = p
    if b == 0:
        return (1 / a, sp.S.Zero)
    n = a * a + b * b
    return (a / n, -b / n)


def _cpow(p, k: int):
    out = (sp.S.One, sp.S.Zero)
    for _ in range(abs(k)):
        out = _cmul(out, p)
    return _cinv(out) if k < 0 else out


class where(sp.Function):
    """where(cond, a, b), kept unevaluated so sympy cannot move a division inside it
    (1/where(c, 1, x) must not become where(c, 1, 1/x): that divides by zero)."""

    nargs = 3


def _where(cond, a, b):
    return where(cond, a, b)


def _series(w, coeffs):
    """sum_k coeffs[k] w^k for a complex pair w (Horner)."""
    out = (sp.S(coeffs[-1]), sp.S.Zero)
    for c in reversed(coeffs[:-1]):
        out = _cmul(out, w)
        out = (out[0] + c, out[1])
    return out


def _phi_safe(w, which):
    """phi1 / phi2 of the pair w = (x, y): Taylor series behind a where near 0, expm1 elsewhere.
    In the Taylor disc the far branch divides by a shifted, nonzero denominator, so it stays
    finite (no 0/0, no NaN gradients through torch.where)."""
    x, y = w
    radius = PHI1_TAYLOR_RADIUS if which == 1 else PHI2_TAYLOR_RADIUS
    terms = 4 if which == 1 else 7
    coeffs = [sp.S.One / sp.factorial(k + which) for k in range(terms)]
    small = (sp.Abs(x) < radius) if y == 0 else (x * x + y * y < radius * radius)  # not dt*|A|: dt may be < 0
    taylor = _series(w, coeffs)
    if y == 0:
        num = (expm1(x) if which == 1 else expm1(x) - x, sp.S.Zero)
    else:
        if which != 1:
            raise SeqcError("phi2 of a complex argument is not supported")
        # expm1(x + iy) without cancellation: expm1(x) cos y - 2 sin(y/2)^2 + i exp(x) sin y
        num = (expm1(x) * sp.cos(y) - 2 * sp.sin(y / 2) ** 2, sp.exp(x) * sp.sin(y))
    shifted = (_where(small, sp.S.One, x), _where(small, sp.S.Zero, y) if y != 0 else sp.S.Zero)
    den = shifted if which == 1 else _cmul(shifted, shifted)
    far = _cmul(num, _cinv(den))
    return tuple(_where(small, t, f) if (t != 0 or f != 0) else sp.S.Zero for t, f in zip(taylor, far))


def _split(expr, env):
    """(re, im) of a sympy expression in A, B, dt (and Abar), with env the pairs of the symbols."""
    if expr in env:
        return env[expr]
    if expr.is_Rational:
        return (expr, sp.S.Zero)
    if not expr.free_symbols:
        value = complex(sp.N(expr, 30))
        return (sp.Float(value.real, 17), sp.Float(value.imag, 17) if value.imag else sp.S.Zero)
    if isinstance(expr, sp.Add):
        parts = [_split(a, env) for a in expr.args]
        return (sp.Add(*(p[0] for p in parts)), sp.Add(*(p[1] for p in parts)))
    if isinstance(expr, sp.Mul):
        out = (sp.S.One, sp.S.Zero)
        for a in expr.args:
            out = _cmul(out, _split(a, env))
        return out
    if isinstance(expr, sp.Pow) and expr.exp.is_Integer:
        return _cpow(_split(expr.base, env), int(expr.exp))
    if isinstance(expr, sp.exp):
        x, y = _split(expr.args[0], env)
        return (sp.exp(x), sp.S.Zero) if y == 0 else (sp.exp(x) * sp.cos(y), sp.exp(x) * sp.sin(y))
    if isinstance(expr, (phi1, phi2)):
        return _phi_safe(_split(expr.args[0], env), 1 if isinstance(expr, phi1) else 2)
    raise SeqcError(f"cannot lower {expr} to a scalar program (supported: + * integer powers, exp, phi1)")


def _to_ir(expr, names):
    """A (cse'd) real sympy expression -> scalar IR tuple; names maps symbols to ("in"|"tmp", name)."""
    if expr in names:
        return names[expr]
    if not expr.free_symbols:
        return ("const", float(expr))
    if isinstance(expr, sp.Add):
        terms = sorted(expr.args, key=lambda t: t.could_extract_minus_sign())
        out = _to_ir(terms[0], names)
        for t in terms[1:]:
            out = ("sub", out, _to_ir(-t, names)) if t.could_extract_minus_sign() else ("add", out, _to_ir(t, names))
        return out
    if isinstance(expr, sp.Mul):
        coeff, rest = expr.as_coeff_Mul()
        if coeff == -1:
            return ("neg", _to_ir(rest, names))
        num, den = [], []
        for f in sp.Mul.make_args(expr):
            if isinstance(f, sp.Pow) and f.exp.is_Integer and f.exp < 0:
                den.append(f.base ** -f.exp)
            else:
                num.append(f)
        out = _product([_to_ir(f, names) for f in num]) if num else ("const", 1.0)
        return ("div", out, _product([_to_ir(f, names) for f in den])) if den else out
    if isinstance(expr, sp.Pow) and expr.exp.is_Integer:
        if expr.exp < 0:
            return ("div", ("const", 1.0), _to_ir(expr.base ** -expr.exp, names))
        return _product([_to_ir(expr.base, names)] * int(expr.exp))
    unary = {sp.exp: "exp", expm1: "expm1", log1p: "log1p", sp.cos: "cos", sp.sin: "sin", sp.Abs: "abs"}
    for cls, op in unary.items():
        if isinstance(expr, cls):
            return (op, _to_ir(expr.args[0], names))
    if isinstance(expr, sp.StrictLessThan):
        return ("lt", _to_ir(expr.lhs, names), _to_ir(expr.rhs, names))
    if isinstance(expr, where):
        return ("where",) + tuple(_to_ir(a, names) for a in expr.args)
    if isinstance(expr, sp.Piecewise):
        *pieces, (last, cond) = expr.args
        if cond != sp.true:
            raise SeqcError(f"cannot lower {expr}: a Piecewise needs an otherwise branch")
        out = _to_ir(last, names)
        for value, c in reversed(pieces):
            out = ("where", _to_ir(c, names), _to_ir(value, names), out)
        return out
    raise SeqcError(f"cannot lower {expr} to a scalar program")


def _product(factors):
    out = factors[0]
    for f in factors[1:]:
        out = ("mul", out, f)
    return out


def scalar_program(name: str, inputs, outputs) -> ScalarProgram:
    """CSE real sympy expressions ``outputs`` ({name: expr}) over the real symbols ``inputs``
    into a ScalarProgram."""
    inputs = tuple(inputs)
    names = {_RE[n]: ("in", n) for n in inputs}
    extra = set().union(*(e.free_symbols for e in outputs.values())) - set(names)
    if extra:
        raise SeqcError(f"cannot lower {name}: unexpected symbols {sorted(map(str, extra))}")
    temps, reduced = sp.cse(list(outputs.values()), symbols=sp.numbered_symbols("t"), optimizations="basic")
    ir_temps = []
    for sym, value in temps:
        ir_temps.append((str(sym), _to_ir(value, names)))
        names[sym] = ("tmp", str(sym))
    ir_outputs = tuple((k, _to_ir(e, names)) for k, e in zip(outputs, reduced))
    return ScalarProgram(name, inputs, tuple(ir_temps), ir_outputs)


def _complex_env(complex_: bool):
    r = _RE
    return {A: (r["A_re"], r["A_im"] if complex_ else sp.S.Zero),
            B: (r["B_re"], r["B_im"] if complex_ else sp.S.Zero),
            dt: (r["dt"], sp.S.Zero)}


def _diag_program(method: str, abar, bbar, complex_: bool) -> ScalarProgram:
    env = _complex_env(complex_)
    (ar, ai), (br, bi) = _split(abar, env), _split(bbar, env)
    tag = "complex" if complex_ else "real"
    if complex_:
        return scalar_program(f"discretize_diag_{method}_{tag}", ("A_re", "A_im", "B_re", "B_im", "dt"),
                              {"Abar_re": ar, "Abar_im": ai, "Bbar_re": br, "Bbar_im": bi})
    return scalar_program(f"discretize_diag_{method}_{tag}", ("A_re", "B_re", "dt"),
                          {"Abar_re": ar, "Bbar_re": br})


def _gain(bbar, method):
    """Bbar / B, checked to be exactly that (Bbar linear in B, no B-free part)."""
    gain = sp.diff(bbar, B)
    if gain.has(B) or sp.simplify(bbar - gain * B) != 0:
        raise SeqcError(f"the {method} discretization's Bbar = {bbar} is not linear in B; "
                        f"the fused kernels need Bbar = gain(A, dt) * B")
    return gain


def _kernel_programs(method: str, abar, bbar):
    """Programs of the CPU kernels (real A): forward (A, dt) -> (Abar, gain) with Bbar = gain*B,
    and the derivatives (A, dt, Abar) -> d(Abar, gain)/d(A, dt), with exp(A dt) read as Abar."""
    gain = _gain(bbar, method)
    env = {A: (_RE["A_re"], sp.S.Zero), dt: (_RE["dt"], sp.S.Zero), B: (sp.S.One, sp.S.Zero)}
    fwd = scalar_program(f"kernel_{method}", ("A_re", "dt"),
                         {"Abar": _split(abar, env)[0], "gain": _split(gain, env)[0]})
    abar_sym = sp.Symbol("Abar_sym")
    derivs = {}
    for out, e in (("Abar", abar), ("gain", gain)):
        for var, vname in ((A, "A"), (dt, "dt")):
            d = sp.diff(e, var).subs(sp.exp(A * dt), abar_sym)
            derivs[f"d{out}_d{vname}"] = d
    genv = {**env, abar_sym: (_RE["Abar"], sp.S.Zero)}
    grad = scalar_program(f"kernel_{method}_grad", ("A_re", "dt", "Abar"),
                          {k: _split(v, genv)[0] for k, v in derivs.items()})
    return fwd, grad


# dense: sympy's printers for the polynomial coefficients -------------------------------

@functools.lru_cache(maxsize=None)
def _torch_printer_class():
    """sympy's TorchPrinter (built on first use: importing it imports torch)."""
    from sympy.printing.pytorch import TorchPrinter

    return TorchPrinter


_PRINTERS = {"numpy": lambda: NumPyPrinter, "torch": _torch_printer_class}


def _printer(backend):
    return _PRINTERS[backend]()({"fully_qualified_modules": True, "strict": True})


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


def _np_prepare_diag(A, B, dt):
    """Arrays (a Python dt stays weakly typed), and whether the complex program applies."""
    A, B = np.asarray(A), np.asarray(B)
    if not isinstance(dt, numbers.Real):
        dt = np.asarray(dt)
        if np.iscomplexobj(dt):
            raise SeqcError("dt must be real")
    return A, B, dt, bool(np.iscomplexobj(A) or np.iscomplexobj(B))


def _numpy_namespace():
    from .expm import expm

    return {"numpy": np, "prepare": _np_prepare, "solve": np.linalg.solve, "expm": expm,
            "phi1_times": _np_phi1_times,
            "finish": lambda a, b, M, x: _finish(a, b, M, x, np.broadcast_to),
            "_prepare": _np_prepare_diag, "_parts": lambda x: (x.real, x.imag),
            "_join": lambda re, im: re + 1j * im}


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

    def prepare_diag(A, B, dt):
        A, B, dt = tensors(A, B, dt)
        if dt.is_complex():
            raise SeqcError("dt must be real")
        return A, B, dt, A.is_complex() or B.is_complex()

    def parts(x):
        return (x.real, x.imag) if x.is_complex() else (x, torch.zeros_like(x))

    def join(re, im):
        re, im = torch.broadcast_tensors(*tensors(re, im))
        dtype = torch.promote_types(re.dtype, im.dtype)
        return torch.complex(re.to(dtype), im.to(dtype))

    def phi1_times(M, X):
        return _block_phi1(M, X, torch.linalg.matrix_exp, torch.zeros, torch.cat,
                           torch.broadcast_shapes, torch.Tensor.expand)

    def solve(a, b):
        # Expand b's batch dims first: torch reads b (N, K) against a (H, N, N), H == N,
        # as H vectors rather than one right-hand side matrix.
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        return torch.linalg.solve(a.expand(batch + a.shape[-2:]), b.expand(batch + b.shape[-2:]))

    return {"torch": torch, "prepare": prepare, "solve": solve, "expm": torch.linalg.matrix_exp,
            "phi1_times": phi1_times,
            "finish": lambda a, b, M, x: _finish(a, b, M, x, torch.Tensor.expand),
            "_prepare": prepare_diag, "_parts": parts, "_join": join}


_NAMESPACES = {"numpy": _numpy_namespace, "torch": _torch_namespace}


# --------------------------------------------------------------------------
# the discretization program (what the discretize pass attaches to a node)
# --------------------------------------------------------------------------

_DIAG_ENTRY = """\
def discretize_diag_{m}(A, B, dt):
    A, B, dt, is_complex = _prepare(A, B, dt)
    if not is_complex:
        return {real}(A, B, dt)
    (A_re, A_im), (B_re, B_im) = _parts(A), _parts(B)
    Abar_re, Abar_im, Bbar_re, Bbar_im = {cplx}(A_re, A_im, B_re, B_im, dt)
    return _join(Abar_re, Abar_im), _join(Bbar_re, Bbar_im)
"""


@dataclass(frozen=True)
class DiscProgram:
    """One node's discretization, lowered and free of sympy.

    ``diag``: scalar programs for real and complex (re/im split) ``(A, B, dt)
    -> (Abar, Bbar)``, plus, where Bbar = gain(A, dt) * B (every built-in
    method), the CPU kernels' programs: ``kernel`` ``(A, dt) -> (Abar, gain)``
    and ``kernel_grad`` ``(A, dt, Abar) -> dAbar_dA, dAbar_ddt, dgain_dA,
    dgain_ddt``.  ``dense``: the matrix-function source per backend.
    ``source(target)`` prints it; ``compile(target)`` gives the callable
    ``(A, B, dt) -> (Abar, Bbar)`` for ``numpy`` / ``torch``.
    """

    structure: str
    method: str
    form: str
    real: ScalarProgram | None = None
    complex: ScalarProgram | None = None
    kernel: ScalarProgram | None = None
    kernel_grad: ScalarProgram | None = None
    dense_sources: tuple = ()          # ((backend, source), ...)

    @property
    def digest(self) -> str:
        if self.structure == "dense":
            return hashlib.sha256(repr(self.dense_sources).encode()).hexdigest()[:16]
        return "-".join(p.digest for p in (self.real, self.complex))

    def source(self, target: str) -> str:
        if self.structure == "dense":
            return dict(self.dense_sources)[_check("backend", target, BACKENDS)]
        entry = _DIAG_ENTRY.format(m=self.method, real=self.real.name, cplx=self.complex.name)
        return self.real.source(target) + "\n" + self.complex.source(target) + "\n" + entry

    def compile(self, target: str):
        """``(A, B, dt) -> (Abar, Bbar)`` (numpy or torch): the printed source, executed once."""
        key = (self.digest, self.method, _check("backend", target, BACKENDS))
        with _COMPILED_LOCK:
            fn = _COMPILED.get(key)
        if fn is None:
            namespace = _NAMESPACES[target]()
            code = self.source(target)
            exec(compile(code, f"<seqc discretize {self.structure} {self.method} {target}>", "exec"), namespace)
            fn = namespace[f"discretize_{self.structure}_{self.method}"]
            with _COMPILED_LOCK:
                fn = _COMPILED.setdefault(key, fn)
        return fn


_COMPILED: dict = {}
_COMPILED_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _program(structure: str, method: str) -> DiscProgram:
    abar, bbar = derivation(structure, method)
    form = describe(structure, method)
    if structure == "dense":
        return DiscProgram(structure, method, form,
                           dense_sources=tuple((b, _dense_source(method, b)) for b in BACKENDS))
    try:
        kernel, grad = _kernel_programs(method, abar, bbar)
    except SeqcError:
        kernel = grad = None      # an override the fused kernels cannot take: torch/numpy still can
    return DiscProgram(structure, method, form, _diag_program(method, abar, bbar, False),
                       _diag_program(method, abar, bbar, True), kernel, grad)


ACTIVATIONS = ("softplus", "silu")


@functools.lru_cache(maxsize=None)
def activation_program(name: str) -> ScalarProgram:
    """``x -> (f, df)``: an activation of the fused scan's prologue (``softplus``, torch's,
    linear above 20) or epilogue (``silu``) and its derivative, derived with sympy once.
    silu's logistic factor is kept as ``1/(1 + exp(-x))`` (finite for every x) rather than
    the quotient of exponentials sympy's derivative would write."""
    x, s = _RE["x"], sp.Symbol("logistic")
    logistic = 1 / (1 + sp.exp(-x))
    if name == "softplus":
        smooth = log1p(sp.exp(x))
        f = where(sp.Lt(20, x), x, smooth)
        df = where(sp.Lt(20, x), sp.S.One, sp.diff(smooth, x))     # exp(x)/(1 + exp(x)), x <= 20
    elif name == "silu":
        f = x * s
        # d logistic / dx = logistic * (1 - logistic)
        df = sp.diff(f, x) + sp.diff(f, s) * s * (1 - s)
        f, df = f.subs(s, logistic), df.subs(s, logistic)
    else:
        raise SeqcError(f"no activation program for {name!r} (known: {', '.join(ACTIVATIONS)})")
    return scalar_program(f"act_{name}", ("x",), {"f": f, "df": df})


def program(structure: str, method: str) -> DiscProgram:
    """The lowered discretization (what the ``discretize`` pass stores in ``node.meta["disc"]``)."""
    return _program(_check("structure", structure, STRUCTURES), _method(method))


def source(structure: str, method: str, backend: str) -> str:
    """The generated Python source of ``discretizer(structure, method, backend)``."""
    return program(structure, method).source(_check("backend", backend, BACKENDS))


def discretizer(structure: str, method: str, backend: str):
    """A callable ``(A, B, dt) -> (Abar, Bbar)`` generated from the derivation.

    ``diag``: elementwise, broadcasting A, B, dt (arrays/tensors, real or
    complex; torch gradients flow through all three).  ``dense``: ``A (N, N)``,
    ``B (N, M)``, ``dt`` scalar or ``(H,)`` gives ``Abar (H, N, N)``,
    ``Bbar (H, N, M)`` (no H axis for a scalar dt).
    """
    prog = program(structure, method)
    return prog.compile(_check("backend", backend, BACKENDS))


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
