"""The NumPy reference semantics of every op, as the numpy code generator calls them.

Each op's oracle lives beside its spec in ``seqc.ops.<family>`` (plain float64
NumPy, written to be obviously correct); this module is a view of that table:
``ops.<name>`` is ``OPS[name].reference``, ``ops.<name>_step`` its
``reference_step`` and ``ops.<name>_init_state`` its ``reference_init_state``,
so an op registered with ``seqc.register_op`` is callable here too.

Calling convention: stateless ``name(*inputs, p=weights, **attrs)`` -> an
array (a tuple for ``split``); stateful ``name(*inputs, p=, state=None,
plan=None, **attrs) -> (y, final_state)`` on sequences ``(B, L, .)``,
``name_step(*inputs_t, p=, state=, **attrs) -> (y_t, new_state)`` on ``(B, .)``,
``name_init_state(batch, p, **attrs)`` -> the zero state (an op without weights
also gets ``features=``, its input's last dimension, to size it).  No function mutates
the state it is given.  State layouts are documented in each family module.
"""
from __future__ import annotations

from seqc.ops import OPS
from seqc.ops.elementwise import ACTIVATIONS  # noqa: F401  (the oracle's activation table)

_SUFFIXES = (("_init_state", "reference_init_state"), ("_step", "reference_step"), ("", "reference"))


def __getattr__(name: str):
    for suffix, field in _SUFFIXES:
        if name.endswith(suffix):
            spec = OPS.get(name[:len(name) - len(suffix)] if suffix else name)
            fn = getattr(spec, field, None) if spec is not None else None
            if fn is not None:
                return fn
    raise AttributeError(f"no NumPy reference {name!r}")


def __dir__():
    names = []
    for op, spec in OPS.items():
        names += [op + suffix for suffix, field in _SUFFIXES if getattr(spec, field) is not None]
    return sorted(names + ["ACTIVATIONS", "OPS"])
