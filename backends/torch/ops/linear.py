"""linear as a torch layer (F.linear on the registry's weight and bias)."""
from __future__ import annotations

import torch.nn.functional as F

from ..base import Pointwise


class Linear(Pointwise):
    op = "linear"

    def map(self, x):
        return F.linear(x, self.weight, self.optional("bias"))
