"""Elementwise ops in torch: the activations (``ACTIVATIONS``, the one table
the layers share, and ``activation(name)``), add / sub / mul, dropout, gate, glu."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from seqc.errors import SeqcError

from ..base import torch_function

ACTIVATIONS = {
    "identity": lambda x: x,
    "silu": F.silu,
    "gelu": F.gelu,              # exact (erf) GELU, torch's default
    "relu": F.relu,
    "softplus": F.softplus,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    """The activation function called `name` (a SeqcError for an unknown one)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise SeqcError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}") from None


def _elementwise(name: str):
    fn = ACTIVATIONS[name]

    def op(x, **_):
        return fn(x)
    op.__name__ = op.__qualname__ = name
    op.__doc__ = f"elementwise {name}"
    return torch_function(name)(op)


silu, gelu, relu, softplus, sigmoid, tanh, gelu_tanh = (
    _elementwise(n) for n in ("silu", "gelu", "relu", "softplus", "sigmoid", "tanh", "gelu_tanh"))


@torch_function("add")
def add(a, b, **_):
    return a + b


@torch_function("sub")
def sub(a, b, **_):
    return a - b


@torch_function("mul")
def mul(a, b, **_):
    return a * b


@torch_function("dropout")
def dropout(x, p: float = 0.0, training: bool = False, **_):
    """torch dropout; identity unless `training` (the reference backend runs at inference)."""
    return F.dropout(x, p=p, training=training)


@torch_function("gate")
def gate(x, g, act: str = "silu", **_):
    """x * act(g)."""
    return x * activation(act)(g)


@torch_function("glu")
def glu(x, act: str = "sigmoid", **_):
    """a * act(b) where a, b are the two halves of the last dimension."""
    if x.shape[-1] % 2:
        raise SeqcError(f"glu needs an even number of features, got {x.shape[-1]}")
    a, b = x.chunk(2, dim=-1)
    return a * activation(act)(b)
