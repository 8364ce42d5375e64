"""layernorm and rmsnorm as torch layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import Pointwise, output_dtype, work_dtype


class LayerNorm(Pointwise):
    op = "layernorm"

    def map(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, getattr(self, "bias", None), self.attrs["eps"])


class RMSNorm(Pointwise):
    op = "rmsnorm"

    def map(self, x):
        """x * rsqrt(mean(x^2) + eps) * weight, computed in at least float32."""
        work = work_dtype(x, self.weight)
        xw = x.to(work)
        y = xw * torch.rsqrt(xw.pow(2).mean(-1, keepdim=True) + self.attrs["eps"]) * self.weight.to(work)
        return y.to(output_dtype(x.dtype, work))
