"""Structural ops in torch: split and concat over the last dimension."""
from __future__ import annotations

import torch

from seqc.ops import split_sizes

from ..base import torch_function


@torch_function("split")
def split(x, sizes, **_):
    """Split the last dimension into a tuple of tensors."""
    return tuple(torch.split(x, split_sizes(x.shape[-1], sizes), dim=-1))


@torch_function("concat")
def concat(*xs, **_):
    """Concatenate along the last dimension."""
    return torch.cat(xs, dim=-1)
