"""The table of ops: ``OPS`` (name -> ``OpSpec``), ``register_op`` and ``lookup``.

Each op family lives in one module of this package - its spec, shape rule,
weights, state, NumPy reference (the oracle every backend is checked
against), initialiser, plan options and fusion traits.  Every module here
(except ``base`` and private ``_*`` ones) is imported on first use of the
package, so a new family is a new file and nothing else.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import (OPS, REQUIRED, Attr, OpSpec, PlanOption, ShapeError, Traits, lookup, register_op,
                   split_sizes)

FAMILIES: list[str] = []

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
        FAMILIES.append(_info.name)

__all__ = ["OPS", "REQUIRED", "Attr", "OpSpec", "PlanOption", "ShapeError", "Traits", "lookup", "register_op",
           "split_sizes", "FAMILIES"]
