"""Elementwise math in torch: exp, sqrt, softmax (features), rms (weightless
RMSNorm, computed in at least float32), div and affine (x * scale + shift)."""
from __future__ import annotations

import torch

from ..base import output_dtype, torch_function, work_dtype


@torch_function("exp")
def exp(x, **_):
    return torch.exp(x)


@torch_function("sqrt")
def sqrt(x, **_):
    return torch.sqrt(x)


@torch_function("softmax")
def softmax(x, **_):
    return torch.softmax(x, dim=-1)


@torch_function("rms")
def rms(x, eps: float = 1e-6, **_):
    work = work_dtype(x)
    xw = x.to(work)
    return (xw * torch.rsqrt(xw.pow(2).mean(-1, keepdim=True) + eps)).to(output_dtype(x.dtype, work))


@torch_function("div")
def div(a, b, **_):
    return a / b


@torch_function("affine")
def affine(x, scale: float = 1.0, shift: float = 0.0, **_):
    y = x * scale if scale != 1.0 else x
    return y + shift if shift != 0.0 else y
