"""Stateless ops of the registry as torch functions (what generated torch code calls as ``fn.<op>``).

Every function takes the op's tensor inputs positionally and the node's
attributes as keywords; attributes an op does not use are accepted and
ignored.  ``FUNCTIONS[name]`` maps each registry op name to its function and
``ACTIVATIONS`` is the one table of activation functions the layers share.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from seqc.errors import SeqcError
from seqc.registry import split_sizes

ACTIVATIONS = {
    "identity": lambda x: x,
    "silu": F.silu,
    "gelu": F.gelu,              # exact (erf) GELU, torch's default
    "relu": F.relu,
    "softplus": F.softplus,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
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
    return op


silu, gelu, relu, softplus, sigmoid, tanh = (
    _elementwise(n) for n in ("silu", "gelu", "relu", "softplus", "sigmoid", "tanh"))


def add(a, b, **_):
    return a + b


def sub(a, b, **_):
    return a - b


def mul(a, b, **_):
    return a * b


def dropout(x, p: float = 0.0, training: bool = False, **_):
    """torch dropout; identity unless `training` (the reference backend runs at inference)."""
    return F.dropout(x, p=p, training=training)


def split(x, sizes, **_):
    """Split the last dimension into a tuple of tensors."""
    return tuple(torch.split(x, split_sizes(x.shape[-1], sizes), dim=-1))


def concat(*xs, **_):
    """Concatenate along the last dimension."""
    return torch.cat(xs, dim=-1)


def gate(x, g, act: str = "silu", **_):
    """x * act(g)."""
    return x * activation(act)(g)


def glu(x, act: str = "sigmoid", **_):
    """a * act(b) where a, b are the two halves of the last dimension."""
    if x.shape[-1] % 2:
        raise SeqcError(f"glu needs an even number of features, got {x.shape[-1]}")
    a, b = x.chunk(2, dim=-1)
    return a * activation(act)(b)


FUNCTIONS = {
    "add": add, "sub": sub, "mul": mul, "dropout": dropout, "split": split, "concat": concat,
    "gate": gate, "glu": glu,
    "silu": silu, "gelu": gelu, "relu": relu, "softplus": softplus, "sigmoid": sigmoid, "tanh": tanh,
}
