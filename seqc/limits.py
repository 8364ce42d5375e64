"""Resource limits of the front end and the CLI, in one place.

Each limit has a default sized for any real model and can be raised (or
lowered) with an environment variable, which every error that hits a limit
names.  Limits are read when they are checked, so setting the variable in a
running process takes effect for the next spec.

    SEQC_MAX_SPEC_BYTES   size of one .seq file (checked before reading it)
    SEQC_MAX_NODES        elaboration work: IR nodes plus block instantiations
                          and statements elaborated (blocks that add no nodes
                          still count, so nested repeats cannot run away)
    SEQC_MAX_DIM_OPS      operations in one symbolic shape expression
    SEQC_MAX_MEMORY       bytes `seqc run` may allocate for weights and
                          activations (`--max-memory` on the command line)
"""
from __future__ import annotations

import os

DEFAULTS = {
    "SEQC_MAX_SPEC_BYTES": 4_000_000,
    "SEQC_MAX_NODES": 200_000,
    "SEQC_MAX_DIM_OPS": 48,
    "SEQC_MAX_MEMORY": 8 * 2 ** 30,
}


def limit(name: str) -> int:
    """The current value of limit `name` (its environment variable, else the default)."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return DEFAULTS[name]
    try:
        value = int(float(raw))
    except ValueError:
        from .errors import SeqcError
        raise SeqcError(f"environment variable {name}={raw!r} is not a number") from None
    return max(0, value)


def how_to_raise(name: str) -> str:
    return f"set {name} to raise it"
