"""The public ``seqc.compile`` and ``seqc.difftest``: thin front doors over
``seqc.compiler.compile`` and ``seqc.differential.difftest`` that accept every
way of naming a spec -- positional (see ``seqc.loader``: ``Path`` = file,
``str`` by the documented rule, ``seqc.Spec``), or the keywords ``path=`` /
``source=`` with ``include_paths=`` and ``allow_any_include=`` -- and check
the arguments a user passes from Python (seed, params, tolerance) before any
work, so a mistake is a ``SeqcError`` rather than a crash deep inside."""
from __future__ import annotations

import functools
import math

from .compiler import compile as _compile
from .differential import difftest as _difftest
from .errors import SeqcError
from .loader import as_spec


def _spec(spec, path, source, include_paths, allow_any_include):
    if path is None and source is None and include_paths is None and allow_any_include is None:
        return spec
    return as_spec(spec, path=path, source=source, include_paths=include_paths,
                   allow_any_include=allow_any_include)


def _check(kwargs):
    seed = kwargs.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise SeqcError(f"seed must be a non-negative integer below 2**63, got {seed!r}")
    params = kwargs.get("params")
    if params is not None and not isinstance(params, dict):
        raise SeqcError(f"params must be a dict of parameter names to values, not {type(params).__name__}")
    tol = kwargs.get("tolerance")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol)
                            or tol <= 0):
        raise SeqcError(f"tolerance must be a positive finite number, got {tol!r}")


@functools.wraps(_compile)
def compile(spec=None, *args, path=None, source=None, include_paths=None, allow_any_include=None, **kwargs):  # noqa: A001
    _check(kwargs)
    return _compile(_spec(spec, path, source, include_paths, allow_any_include), *args, **kwargs)


@functools.wraps(_difftest)
def difftest(spec=None, *args, path=None, source=None, include_paths=None, allow_any_include=None, **kwargs):
    _check(kwargs)
    return _difftest(_spec(spec, path, source, include_paths, allow_any_include), *args, **kwargs)


for _fn in (compile, difftest):
    _fn.__doc__ = (_fn.__doc__ or "") + """

    The spec may also be given as ``path=`` (a .seq file) or ``source=`` (its
    text), with ``include_paths=`` (extra include roots) and
    ``allow_any_include=True`` (lift the include roots)."""
