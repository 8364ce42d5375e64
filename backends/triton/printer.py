"""The Triton printer: a scalar program (named assignments over a tiny op set) -> Triton source.

Owns two steps, kept apart so the input side can change without touching the
output side:

* ``scalar_program(outputs)`` lowers sympy expressions (the discretization
  derivation of ``seqc.discretization`` and its derivatives, all taken at
  compile time) to a list of ``(name, op_tree)`` assignments after common
  subexpression elimination.  An op tree is ``("var", name)``,
  ``("const", value)`` or ``(op, arg, ...)`` with ``op`` in ``OPS``.
* ``print_program(assignments)`` prints them as Triton statements through the
  table ``OPS`` (op -> format string).  No sympy is imported by the printed
  code; ``expm1`` is the helper ``_expm1`` of the generated module.

``phi1(z) = expm1(z)/z`` is printed in its safe form (Taylor series inside
``|z| < PHI1_TAYLOR_RADIUS``, the denominator shifted there so the unused
branch stays finite), as ``seqc.discretization`` prints it for NumPy/torch.
Its derivative ``phi1'(z) = (z exp(z) - expm1(z)) / z^2`` gets its own Taylor
branch (radius 0.1, 8 terms: the closed form cancels near 0).

``diag_discretization(method, grads)`` is the one entry the kernels use: the
program computing ``a = Abar(A, dt)`` and ``g = Bbar(A, 1, dt)`` (the gain
multiplying ``B_t u_t``) for real ``A``, plus ``a_A, a_dt, g_A, g_dt`` for the
backward kernel.
"""
from __future__ import annotations

import math

import sympy as sp

from seqc.discretization import PHI1_TAYLOR_RADIUS, derivation, phi1
from seqc.discretization import A as SYM_A
from seqc.discretization import B as SYM_B
from seqc.discretization import dt as SYM_DT
from seqc.errors import SeqcError

# op -> Triton format string; the whole target-specific surface of the printer.
OPS = {
    "add": "({} + {})",
    "sub": "({} - {})",
    "mul": "({} * {})",
    "div": "({} / {})",
    "neg": "(-{})",
    "exp": "tl.exp({})",
    "expm1": "_expm1({})",
    "log": "tl.log({})",
    "sqrt": "tl.sqrt({})",
    "abs": "tl.abs({})",
    "lt": "({} < {})",
    "gt": "({} > {})",
    "where": "tl.where({}, {}, {})",
}

PHI1P_TAYLOR_RADIUS = 0.1
_PHI1P_TERMS = 8

# Names of the discretization program's inputs inside a kernel.
INPUT_NAMES = {SYM_A: "A", SYM_DT: "dt"}


class Phi1(sp.Function):
    """phi1 whose derivative is the opaque ``Phi1p`` (printed safely), not a quotient in z."""

    nargs = 1

    def fdiff(self, argindex=1):
        return Phi1p(self.args[0])


class Phi1p(sp.Function):
    """phi1'(z) = (z exp(z) - expm1(z)) / z^2."""

    nargs = 1


def _const(value) -> tuple:
    return ("const", float(value))


def _horner(coeffs, w):
    """sum_k coeffs[k] w^k nested as c0 + w (c1 + w (c2 + ...)), so w = A*dt stays one product."""
    out = coeffs[-1]
    for c in reversed(coeffs[:-1]):
        out = c + w * out
    return out


def _safe(expr):
    """Replace Phi1 / Phi1p by their printable piecewise forms."""
    def phi1_safe(w):
        small = sp.Abs(w, evaluate=False) < PHI1_TAYLOR_RADIUS
        taylor = _horner([sp.Rational(1, math.factorial(k + 1)) for k in range(4)], w)
        shifted = w + sp.Piecewise((1, small), (0, True))
        return sp.Piecewise((taylor, small), (sp.Function("expm1")(w) / shifted, True))

    def phi1p_safe(w):
        small = sp.Abs(w, evaluate=False) < PHI1P_TAYLOR_RADIUS
        # phi1'(z) = sum_k (k+1) z^k / (k+2)!
        taylor = _horner([sp.Rational(k + 1, math.factorial(k + 2)) for k in range(_PHI1P_TERMS)], w)
        shifted = w + sp.Piecewise((1, small), (0, True))
        closed = (w * sp.exp(w) - sp.Function("expm1")(w)) / shifted**2
        return sp.Piecewise((taylor, small), (closed, True))

    return expr.replace(Phi1p, phi1p_safe).replace(Phi1, phi1_safe)


def to_ops(expr, names: dict) -> tuple:
    """A sympy expression -> an op tree over OPS (names: Symbol -> variable name)."""
    if isinstance(expr, sp.Symbol):
        if expr not in names:
            raise SeqcError(f"the Triton printer has no value for symbol {expr}")
        return ("var", names[expr])
    if expr.is_Number:
        if not expr.is_real:
            raise SeqcError(f"the Triton printer needs real constants, got {expr}")
        return _const(expr)
    if isinstance(expr, sp.Add):
        pos, neg = [], []
        for term in expr.args:
            coeff, rest = term.as_coeff_Mul()
            (neg if coeff.is_negative else pos).append(-term if coeff.is_negative else term)
        tree = to_ops(pos[0], names) if pos else ("neg", to_ops(neg.pop(0), names))
        for t in pos[1:]:
            tree = ("add", tree, to_ops(t, names))
        for t in neg:
            tree = ("sub", tree, to_ops(t, names))
        return tree
    if isinstance(expr, sp.Mul):
        num, den = [], []
        coeff, factors = expr.as_coeff_mul()
        for f in factors:
            if isinstance(f, sp.Pow) and f.exp.is_negative:
                den.append(f.base ** -f.exp)
            else:
                num.append(f)
        magnitude = abs(coeff)
        tree = None if magnitude == 1 and num else _const(magnitude)
        for f in num:
            t = to_ops(f, names)
            tree = t if tree is None else ("mul", tree, t)
        for f in den:
            tree = ("div", tree, to_ops(f, names))
        return ("neg", tree) if coeff.is_negative else tree
    if isinstance(expr, sp.Pow):
        base, e = expr.args
        if e == sp.S.Half:
            return ("sqrt", to_ops(base, names))
        if e.is_Integer:
            n = int(e)
            if n < 0:
                return ("div", _const(1), to_ops(base ** -n, names))
            tree = b = to_ops(base, names)
            for _ in range(n - 1):
                tree = ("mul", tree, b)
            return tree
        raise SeqcError(f"the Triton printer cannot raise to the power {e}")
    if isinstance(expr, sp.exp):
        return ("exp", to_ops(expr.args[0], names))
    if isinstance(expr, sp.log):
        return ("log", to_ops(expr.args[0], names))
    if isinstance(expr, sp.Abs):
        return ("abs", to_ops(expr.args[0], names))
    if isinstance(expr, sp.Function) and expr.func.__name__ == "expm1":
        return ("expm1", to_ops(expr.args[0], names))
    if isinstance(expr, sp.StrictLessThan):
        return ("lt", to_ops(expr.lhs, names), to_ops(expr.rhs, names))
    if isinstance(expr, sp.StrictGreaterThan):
        return ("gt", to_ops(expr.lhs, names), to_ops(expr.rhs, names))
    if isinstance(expr, sp.Piecewise):
        *pieces, (last, cond) = expr.args
        if cond != sp.true:
            raise SeqcError("the Triton printer needs a Piecewise with an otherwise branch")
        tree = to_ops(last, names)
        for value, c in reversed(pieces):
            tree = ("where", to_ops(c, names), to_ops(value, names), tree)
        return tree
    raise SeqcError(f"the Triton printer has no rule for {type(expr).__name__} ({expr})")


def scalar_program(outputs: dict, inputs: dict | None = None, prefix: str = "_t") -> list:
    """{output name: sympy expr} -> [(name, op tree)] with CSE temporaries first."""
    names = dict(INPUT_NAMES if inputs is None else inputs)
    exprs = [_safe(e) for e in outputs.values()]
    temps, finals = sp.cse(exprs, symbols=sp.numbered_symbols(prefix))
    program = []
    for sym, value in temps:
        program.append((str(sym), to_ops(value, names)))
        names[sym] = str(sym)
    for name, value in zip(outputs, finals):
        program.append((name, to_ops(value, names)))
    return program


def print_tree(tree) -> str:
    op, *args = tree
    if op == "var":
        return args[0]
    if op == "const":
        return repr(float(args[0]))
    if op not in OPS:
        raise SeqcError(f"the Triton printer has no format for op {op!r}")
    return OPS[op].format(*(print_tree(a) for a in args))


def print_program(program, indent: str = "    ") -> list[str]:
    """Triton statements, one per assignment."""
    return [f"{indent}{name} = {print_tree(tree)}" for name, tree in program]


def diag_expressions(method: str, grads: bool = False) -> dict:
    """{a, g[, a_A, a_dt, g_A, g_dt]} as sympy expressions in the real symbols A and dt."""
    abar, bbar = derivation("diag", method)
    gain = bbar.subs(SYM_B, 1)
    if gain.has(SYM_B) or abar.has(SYM_B):
        raise SeqcError(f"the {method} discretization is not linear in B")
    abar, gain = (e.replace(phi1, Phi1) for e in (abar, gain))
    out = {"a": abar, "g": gain}
    if grads:
        out.update(a_A=sp.diff(abar, SYM_A), a_dt=sp.diff(abar, SYM_DT),
                   g_A=sp.diff(gain, SYM_A), g_dt=sp.diff(gain, SYM_DT))
    return out


def diag_discretization(method: str, grads: bool = False) -> list:
    """The scalar program of the diagonal discretization (and its partial derivatives)."""
    return scalar_program(diag_expressions(method, grads))


def jit_function(name: str, program, args=("A", "dt")) -> str:
    """A ``@triton.jit`` function computing the program and returning its non-temporary outputs."""
    outs = [n for n, _ in program if not n.startswith("_t")]
    lines = ["@triton.jit", f"def {name}({', '.join(args)}):"]
    lines += print_program(program)
    lines.append(f"    return {', '.join(outs)}")
    return "\n".join(lines) + "\n"
