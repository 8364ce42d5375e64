"""embedding as a torch layer (rows of the table for integer tokens)."""
from __future__ import annotations

import torch.nn.functional as F

from seqc.errors import SeqcError

from ..base import Pointwise


class Embedding(Pointwise):
    op = "embedding"

    def map(self, tokens):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex:
            raise SeqcError(f"embedding needs integer tokens, got {tokens.dtype}")
        return F.embedding(tokens, self.weight)
