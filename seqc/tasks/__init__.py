"""Synthetic sequence tasks for training seqc-compiled models: the data
generators of the Mamba paper's section 4.1 (selective copying, induction
heads), behind one registry, ``TASKS``, that ``seqc.train`` draws batches from.

Every generator is a pure function of ``(rng, batch, length)`` returning
``(tokens, targets, mask)`` as int64/int64/bool NumPy arrays of shape
``(batch, length)``: the model reads ``tokens`` and is scored (loss and
accuracy) on ``targets`` where ``mask`` is true.  Batches are drawn from an RNG
seeded by ``(seed, step)``, so a run is reproducible and a resumed run sees
exactly the batches the uninterrupted one would have seen.
"""
from __future__ import annotations

from ..errors import SeqcError, did_you_mean
from .base import Task
from .induction_heads import InductionHeads
from .selective_copying import SelectiveCopying

TASKS: dict[str, type[Task]] = {t.name: t for t in (SelectiveCopying, InductionHeads)}


def get_task(name: str, **kwargs) -> Task:
    """The task called `name` (``-`` and ``_`` are the same), built with `kwargs`."""
    key = name.replace("-", "_")
    if key not in TASKS:
        raise SeqcError(f"unknown task {name!r}{did_you_mean(key, list(TASKS))}; expected one of "
                        f"{', '.join(TASKS)}")
    return TASKS[key](**kwargs)


__all__ = ["TASKS", "Task", "SelectiveCopying", "InductionHeads", "get_task"]
