"""Selective copying (Gu & Dao 2023, section 4.1.1; Jing et al.'s variant of
the copying task): `n_tokens` data tokens scattered at random positions among
noise tokens, followed by `n_tokens` recall markers; at each marker the model
must output the data tokens in the order they appeared.  Because the spacing is
random, a time-invariant convolution cannot solve it with a fixed kernel: the
model has to select what to keep based on content.

Token ids: 0 = noise, 1 = recall marker, 2 .. 2 + n_data - 1 = data tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Task, _positive

NOISE, MARKER, FIRST = 0, 1, 2


@dataclass(frozen=True)
class SelectiveCopying(Task):
    n_tokens: int = 16      # tokens to memorise
    n_data: int = 16        # distinct data tokens (the paper's vocabulary of 16)
    name = "selective_copying"

    def __post_init__(self):
        _positive(self.name, n_tokens=self.n_tokens, n_data=self.n_data)

    @property
    def vocab(self) -> int:
        return self.n_data + FIRST

    @property
    def n_classes(self) -> int:
        return self.n_data

    def min_length(self) -> int:
        return 2 * self.n_tokens

    def batch(self, rng, batch, length):
        k = self.n_tokens
        span = self.check_length(length) - k          # the noisy prefix holding the data tokens
        tokens = np.full((batch, length), NOISE, dtype=np.int64)
        data = rng.integers(FIRST, FIRST + self.n_data, size=(batch, k))
        # k distinct positions in [0, span) per row, kept in increasing order
        pos = np.sort(np.argsort(rng.random((batch, span)), axis=1)[:, :k], axis=1)
        np.put_along_axis(tokens, pos, data, axis=1)
        tokens[:, span:] = MARKER
        targets = np.zeros((batch, length), dtype=np.int64)
        targets[:, span:] = data
        mask = np.zeros((batch, length), dtype=bool)
        mask[:, span:] = True
        return tokens, targets, mask
