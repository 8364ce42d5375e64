"""Induction heads (Olsson et al. 2022; Gu & Dao 2023, section 4.1.2): a random
sequence over `n_data` tokens in which a special trigger token appears once
followed by an answer token; the sequence ends with the trigger again, and the
model must output the answer there.  Solving it needs associative recall (find
the earlier trigger, copy what followed); a model that learns the mechanism
rather than the positions extrapolates to longer sequences.

Token ids: 0 = trigger, 1 .. n_data = ordinary tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Task, _positive

TRIGGER = 0


@dataclass(frozen=True)
class InductionHeads(Task):
    n_data: int = 16
    name = "induction_heads"

    def __post_init__(self):
        _positive(self.name, n_data=self.n_data)

    @property
    def vocab(self) -> int:
        return self.n_data + 1

    @property
    def n_classes(self) -> int:
        return self.n_data

    def min_length(self) -> int:
        return 3

    def batch(self, rng, batch, length):
        L = self.check_length(length)
        tokens = rng.integers(1, self.n_data + 1, size=(batch, L))
        # the first trigger anywhere before the final position, with room for its answer
        where = rng.integers(0, L - 2, size=batch)
        rows = np.arange(batch)
        tokens[rows, where] = TRIGGER
        answer = tokens[rows, where + 1]
        tokens[:, -1] = TRIGGER
        targets = np.zeros((batch, L), dtype=np.int64)
        targets[:, -1] = answer
        mask = np.zeros((batch, L), dtype=bool)
        mask[:, -1] = True
        return tokens.astype(np.int64), targets, mask
