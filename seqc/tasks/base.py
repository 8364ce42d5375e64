"""The task interface shared by the synthetic tasks."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import SeqcError


@dataclass(frozen=True)
class Task:
    """A synthetic task: `vocab` is the model's vocabulary (input and output
    ids), `n_classes` the number of answers a guess is drawn from (chance loss
    is ln(n_classes))."""
    name = "task"

    @property
    def vocab(self) -> int:
        raise NotImplementedError

    @property
    def n_classes(self) -> int:
        raise NotImplementedError

    @property
    def chance_loss(self) -> float:
        return math.log(self.n_classes)

    def min_length(self) -> int:
        return 1

    def batch(self, rng: np.random.Generator, batch: int, length: int):
        """(tokens, targets, mask), each (batch, length)."""
        raise NotImplementedError

    def check_length(self, length: int) -> int:
        if length < self.min_length():
            raise SeqcError(f"task {self.name}: --length must be at least {self.min_length()} "
                            f"for these settings, got {length}")
        return length


def _positive(task: str, **values):
    for k, v in values.items():
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise SeqcError(f"task {task}: {k} must be a positive integer, got {v!r}")
