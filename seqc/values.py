"""Values during elaboration: tensors (graph references with shapes), enum
symbols, exact parameter arithmetic, and the checking of layer attributes
against the op table.  Only the arithmetic here and the functions in
``registry.PARAM_FUNCTIONS`` are ever applied to a spec's values."""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from .errors import SeqcError, did_you_mean
from .ir import Ref

MAX_ATTR_INT = 2 ** 24  # features, vocabularies, kernel sizes: larger is a mistake, not a model

@dataclass(frozen=True)
class Tensor:
    ref: Ref
    shape: tuple
    dtype: str


class Sym(str):
    """A bare identifier used where an enum value is expected (e.g. plan = conv)."""


def to_number(v):
    if isinstance(v, Fraction):
        return int(v) if v.denominator == 1 else float(v)
    return v


def as_integer(v):
    """`v` as an int where it is an integer value (an int, an integral Fraction such as
    ``8 / 2`` or ``2 ** 2``, an integral float such as ``4.0``); anything else unchanged.
    One rule for every place that wants an integer: attributes, split sizes, dimensions
    and repeat counts."""
    if isinstance(v, Fraction) and v.denominator == 1:
        return int(v)
    if isinstance(v, float) and v.is_integer() and abs(v) <= 2 ** 62:
        return int(v)
    return v


def is_number(v) -> bool:
    return isinstance(v, (int, float, Fraction)) and not isinstance(v, bool)


def arith(op, a, b, span):
    if not (is_number(a) and is_number(b)):
        raise SeqcError(f"cannot apply '{op}' to {kind_of(a)} and {kind_of(b)}", span)
    if isinstance(a, float) or isinstance(b, float):
        a, b = float(a), float(b)
    try:
        if op == "+":
            r = a + b
        elif op == "-":
            r = a - b
        elif op == "*":
            r = a * b
        elif op == "/":
            r = Fraction(a) / Fraction(b) if not isinstance(a, float) else a / b
        elif op == "//":
            r = a // b
        elif op == "%":
            r = a % b
        else:  # **
            if abs(b) > 64 or (abs(a) > 2 ** 20 and b > 4):
                raise SeqcError("exponent too large", span)
            r = Fraction(a) ** b if not isinstance(a, float) and isinstance(b, int) else float(a) ** float(b)
    except ZeroDivisionError:
        raise SeqcError("division by zero", span) from None
    except OverflowError:
        raise SeqcError("number too large", span) from None
    if isinstance(r, Fraction) and (abs(r.numerator) > 2 ** 62 or r.denominator > 2 ** 62):
        raise SeqcError("number too large", span)
    if isinstance(r, int) and abs(r) > 2 ** 62:
        raise SeqcError("number too large", span)
    if isinstance(r, float) and not math.isfinite(r):
        raise SeqcError("number too large", span)
    return r


def kind_of(v) -> str:
    if isinstance(v, Tensor):
        return "a tensor"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, Sym):
        return f"the name '{v}'"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    return "a number"


def fmt_shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_attr(spec, a, v, span):
    where = f"'{spec.name}' argument '{a.name}'"
    if isinstance(v, Tensor):
        raise SeqcError(f"{where} must be a {a.type}, not a tensor", span)
    if isinstance(v, Fraction):
        v = to_number(v)
    if a.type == "int":
        v = as_integer(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise SeqcError(f"{where} must be an integer, got {show(v)}", span)
    elif a.type == "float":
        if not is_number(v):
            raise SeqcError(f"{where} must be a number, got {show(v)}", span)
        v = float(v)
    elif a.type == "bool":
        if not isinstance(v, bool):
            raise SeqcError(f"{where} must be true or false, got {show(v)}", span)
    elif a.type == "enum":
        if not isinstance(v, str):
            raise SeqcError(f"{where} must be one of {', '.join(a.choices)}, got {show(v)}", span)
        canon = {c.replace("-", "_"): c for c in a.choices}
        key = v.replace("-", "_")
        if key not in canon:
            raise SeqcError(f"{where}: unknown value '{v}'{did_you_mean(v, a.choices)}; "
                            f"expected one of {', '.join(a.choices)}", span)
        return canon[key]
    elif a.type == "sizes":
        v = [as_integer(x) for x in v] if isinstance(v, list) else as_integer(v)
        if isinstance(v, list):
            if not v or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
                raise SeqcError(f"{where} must be a list of positive integers", span)
            return [int(x) for x in v]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SeqcError(f"{where} must be a positive integer or a list of them, got {show(v)}", span)
        return v
    if a.type == "int" and a.max is None and v > MAX_ATTR_INT:
        raise SeqcError(f"{where} is too large ({v}; at most {MAX_ATTR_INT})", span)
    if a.type in ("int", "float"):
        if a.positive and v <= 0:
            raise SeqcError(f"{where} must be positive, got {show(v)}", span)
        if a.min is not None and v < a.min:
            raise SeqcError(f"{where} must be at least {a.min}, got {show(v)}", span)
        if a.max is not None and v > a.max:
            raise SeqcError(f"{where} must be at most {a.max}, got {show(v)}", span)
    return v


def show(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Sym):
        return f"'{v}'"
    if isinstance(v, str):
        return f'"{v}"'
    return str(v)
