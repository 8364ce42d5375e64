"""Compatibility names for the table of ops, which lives in ``seqc.ops`` (one
module per op family).  ``PARAM_FUNCTIONS`` - the functions a spec may apply to
parameter values - is defined here."""
from __future__ import annotations

import math
from typing import Callable

from .ops import OPS, REQUIRED, Attr, OpSpec, PlanOption, ShapeError, Traits, lookup, register_op, split_sizes

op = register_op

PARAM_FUNCTIONS: dict[str, Callable] = {
    "ceil": lambda x: math.ceil(x), "floor": lambda x: math.floor(x),
    "min": min, "max": max, "int": lambda x: int(x), "round": lambda x: int(round(x)),
}

__all__ = ["OPS", "REQUIRED", "Attr", "OpSpec", "PlanOption", "ShapeError", "Traits", "lookup", "register_op", "op",
           "split_sizes", "PARAM_FUNCTIONS"]
