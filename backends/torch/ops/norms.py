"""layernorm and rmsnorm as torch layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import Pointwise, output_dtype, work_dtype


class LayerNorm(Pointwise):
    op = "layernorm"

    def map(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.optional("bias"), self.attrs["eps"])


class RMSNorm(Pointwise):
    op = "rmsnorm"

    def map(self, x):
        """x * rsqrt(mean(x^2) + eps) * weight, computed in at least float32."""
        work = work_dtype(x, self.weight)
        xw, w = (t if t.dtype == work else t.to(work) for t in (x, self.weight))
        y = xw * torch.rsqrt(xw.pow(2).mean(-1, keepdim=True) + self.attrs["eps"]) * w
        out = output_dtype(x.dtype, work)
        return y if y.dtype == out else y.to(out)
