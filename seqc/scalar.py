"""Scalar programs: the small, sympy-free IR that derived formulas are printed from.

A ``ScalarProgram`` is immutable: named real inputs, common sub-expressions
bound once to temporaries, and named real outputs (complex quantities are
split into ``_re`` / ``_im`` parts before they get here).  Expressions are
nested tuples ``(op, *args)``:

    ("in", name)  ("tmp", name)  ("const", float)
    ("add", a, b)  ("sub", a, b)  ("mul", a, b)  ("div", a, b)  ("neg", a)
    ("exp", a)  ("expm1", a)  ("log1p", a)  ("cos", a)  ("sin", a)  ("abs", a)
    ("lt", a, b)  ("where", cond, a, b)

A *printer* is a table from op to a format string (``"{0} + {1}"``) with a
precedence, plus a few names (how a function header and a return look).  The
tables for ``numpy``, ``torch`` and ``numba`` (scalar Python inside the
generated CPU kernels, with ``_exp`` and ``_log1p`` the kernels' vectorisable exp
and log1p) live here;
other backends add theirs with ``register_printer`` (the Triton backend
registers ``tl.exp``, ``libdevice.expm1``, ``tl.where``).

``ScalarProgram.source(target)`` prints a Python function;
``ScalarProgram.compile(target)`` executes that source once per program and
target (cached) in the target's namespace; ``ScalarProgram.inline(target,
names, prefix)`` gives the statements and output expressions to paste into a
generated kernel.  Nothing here imports sympy.
"""
from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass, field

ATOMS = ("in", "tmp", "const")
OPS = ATOMS + ("add", "sub", "mul", "div", "neg", "exp", "expm1", "log1p", "cos", "sin", "abs", "lt", "where")


@dataclass(frozen=True)
class Printer:
    """How one target spells the scalar ops.

    ``ops`` maps an op to ``(format, precedence)``; the format's ``{0}``,
    ``{1}``... are the printed arguments, and an argument whose own precedence
    is lower than the op's is parenthesised (precedence 100 = atom or call).
    ``namespace`` builds the globals the printed code runs in.
    """

    name: str
    ops: dict
    namespace: object = None      # () -> dict, for compile()
    const: object = repr          # float -> source text

    def expr(self, e, names) -> str:
        return self._print(e, names)[0]

    def _print(self, e, names):
        op = e[0]
        if op in ("in", "tmp"):
            return names.get(e[1], e[1]), 100
        if op == "const":
            v = float(e[1])
            text = self.const(v)
            return (text, 100) if v >= 0 else (text, 50)   # a negative literal binds like a unary minus
        fmt, prec = self.ops[op]
        args = []
        for k, a in enumerate(e[1:]):
            text, p = self._print(a, names)
            # (precedence 100: a call, whose arguments need no parentheses); equal precedence
            # needs them except as the left operand of a left-associative op
            if prec < 100 and (p < prec or (p == prec and not (k == 0 and op in ("add", "sub", "mul", "div")))):
                text = f"({text})"
            args.append(text)
        return fmt.format(*args), prec


PRINTERS: dict[str, Printer] = {}
_LOCK = threading.Lock()
_COMPILED: dict = {}         # (program digest, target) -> compiled function


def register_printer(printer: Printer) -> None:
    """Add (or replace) the table of a target; programs then print for it."""
    PRINTERS[printer.name] = printer
    with _LOCK:
        for key in [k for k in _COMPILED if k[1] == printer.name]:
            del _COMPILED[key]


def _arith(prefix: str, where: tuple, extra: dict) -> dict:
    ops = {"add": ("{0} + {1}", 20), "sub": ("{0} - {1}", 20), "mul": ("{0}*{1}", 30),
           "div": ("{0}/{1}", 30), "neg": ("-{0}", 50), "lt": ("{0} < {1}", 10),
           "exp": (f"{prefix}exp({{0}})", 100), "expm1": (f"{prefix}expm1({{0}})", 100),
           "log1p": (f"{prefix}log1p({{0}})", 100),
           "cos": (f"{prefix}cos({{0}})", 100), "sin": (f"{prefix}sin({{0}})", 100),
           "abs": (f"{prefix}abs({{0}})", 100), "where": where}
    ops.update(extra)
    return ops


def _numpy_namespace():
    import numpy

    return {"numpy": numpy}


def _torch_namespace():
    import torch

    return {"torch": torch}


def _numba_namespace():
    return {"math": math, "_exp": math.exp, "_log1p": math.log1p}


register_printer(Printer("numpy", _arith("numpy.", ("numpy.where({0}, {1}, {2})", 100), {}), _numpy_namespace))
register_printer(Printer("torch", _arith("torch.", ("torch.where({0}, {1}, {2})", 100), {}), _torch_namespace))
# Scalar Python for the generated numba kernels: exp and log1p are the kernels' vectorisable
# _exp and _log1p (libm's would keep the loops scalar).
register_printer(Printer("numba", _arith("math.", ("{1} if {0} else {2}", 5), {"exp": ("_exp({0})", 100),
                                                                          "log1p": ("_log1p({0})", 100),
                                                                          "abs": ("abs({0})", 100)}),
                         _numba_namespace))


@dataclass(frozen=True)
class ScalarProgram:
    """Named inputs -> CSE'd temporaries -> named outputs, all real scalars (or arrays,
    elementwise).  Immutable and hashable; ``digest`` identifies the program text."""

    name: str
    inputs: tuple
    temps: tuple      # ((name, expr), ...) in evaluation order
    outputs: tuple    # ((name, expr), ...)
    digest: str = field(default="", compare=False)

    def __post_init__(self):
        for _, e in self.temps + self.outputs:
            _validate(e)
        text = repr((self.name, self.inputs, self.temps, self.outputs))
        object.__setattr__(self, "digest", hashlib.sha256(text.encode()).hexdigest()[:16])

    @property
    def output_names(self) -> tuple:
        return tuple(n for n, _ in self.outputs)

    def output(self, name: str):
        return dict(self.outputs)[name]

    def constant(self, name: str):
        """The output's value if it is a constant, else None."""
        e = self.output(name)
        return float(e[1]) if e[0] == "const" else None

    def alias(self, name: str):
        """The input an output equals, if it is just an input, else None."""
        e = self.output(name)
        return e[1] if e[0] == "in" else None

    def inline(self, target: str, names: dict | None = None, prefix: str = "_t"):
        """(statements, {output: expression}) for pasting into generated code:
        inputs spelled as in ``names`` (default: their own names), temporaries
        renamed ``prefix + name``."""
        printer = _printer(target)
        env = dict(names or {})
        lines = []
        for name, e in self.temps:
            lines.append(f"{prefix}{name} = {printer.expr(e, env)}")
            env[name] = f"{prefix}{name}"
        return lines, {n: printer.expr(e, env) for n, e in self.outputs}

    def source(self, target: str) -> str:
        """A Python function ``name(*inputs) -> tuple of outputs`` in the target's spelling."""
        lines, outs = self.inline(target, prefix="")
        body = [f"def {self.name}({', '.join(self.inputs)}):"] + [f"    {ln}" for ln in lines]
        body.append(f"    return {', '.join(outs[n] for n in self.output_names)}{',' if len(outs) == 1 else ''}")
        return "\n".join(body) + "\n"

    def compile(self, target: str):
        """The printed function, executed once per (program, target) and cached."""
        key = (self.digest, target)
        with _LOCK:
            fn = _COMPILED.get(key)
        if fn is None:
            printer = _printer(target)
            namespace = printer.namespace() if printer.namespace else {}
            code = self.source(target)
            exec(compile(code, f"<seqc scalar program {self.name} [{target}]>", "exec"), namespace)
            fn = namespace[self.name]
            with _LOCK:
                fn = _COMPILED.setdefault(key, fn)
        return fn


def _printer(target: str) -> Printer:
    try:
        return PRINTERS[target]
    except KeyError:
        from .errors import SeqcError
        raise SeqcError(f"no scalar printer for target {target!r}; known: {', '.join(sorted(PRINTERS))}") from None


def _validate(e):
    if not isinstance(e, tuple) or not e or e[0] not in OPS:
        raise ValueError(f"not a scalar expression: {e!r}")
    if e[0] == "const":
        float(e[1])
    elif e[0] in ("in", "tmp"):
        if not (isinstance(e[1], str) and e[1].isidentifier()):
            raise ValueError(f"bad name in {e!r}")
    else:
        for a in e[1:]:
            _validate(a)
