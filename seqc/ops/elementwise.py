"""Elementwise ops: the activations (silu gelu relu softplus sigmoid tanh gelu_tanh),
dropout, add / sub / mul, gate (x * act(g)) and glu - specs, shape rules and
their NumPy references.  ``ACTIVATIONS`` is the oracle's one table of
activation functions (conv1d and selective_ssm use it too)."""
from __future__ import annotations

import math

import numpy as np

from ..errors import SeqcError
from .base import (ACTIVATION_NAMES, Attr, OpSpec, ShapeError, Traits, check_same, f64, last, register_op,
                   same_as_first, with_defaults)

_erf = np.vectorize(math.erf, otypes=[np.float64])


def sigmoid_fn(x):
    return np.exp(-np.logaddexp(0.0, -x))


def softplus_fn(x):
    """torch.nn.functional.softplus (beta 1, threshold 20), as mamba_ssm uses it."""
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


ACTIVATIONS = {
    "identity": lambda x: x,
    "silu": lambda x: x * sigmoid_fn(x),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),   # exact (erf) GELU, torch's default
    "relu": lambda x: np.maximum(x, 0.0),
    "softplus": softplus_fn,
    "sigmoid": sigmoid_fn,
    "tanh": np.tanh,
    # GELU's tanh approximation (torch gelu(approximate="tanh"), Gemma's gelu_pytorch_tanh)
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))),
}

_ELEMENTWISE = Traits(epilogue_ok=True)


def _activation_op(name: str):
    fn = ACTIVATIONS[name]

    def act(x, *, p=None, **_):
        return fn(f64(x))
    act.__name__ = act.__qualname__ = name
    act.__doc__ = f"elementwise {name}"
    return act


for _act in ACTIVATION_NAMES[1:]:
    register_op(OpSpec(_act, ("x",), shape=same_as_first, kind="activation", doc=f"elementwise {_act}",
                       reference=_activation_op(_act), traits=Traits(activation=True, epilogue_ok=True)))


def dropout(x, **_):
    """Identity: the reference backend runs at inference (the attribute `p` is the drop rate)."""
    return f64(x)


def _dropout_identity(node):
    return node.inputs[0] if node.attrs.get("p", 0.0) == 0.0 else None


register_op(OpSpec("dropout", ("x",), (Attr("p", "float", 0.0, min=0.0, max=0.999),), shape=same_as_first,
                   kind="activation", doc="identity at inference and in the reference backend",
                   reference=dropout, traits=Traits(epilogue_ok=True, identity=_dropout_identity)))


def add(a, b, *, p=None, **_):
    return f64(a) + f64(b)


def sub(a, b, *, p=None, **_):
    return f64(a) - f64(b)


def mul(a, b, *, p=None, **_):
    return f64(a) * f64(b)


for _fn in (add, sub, mul):
    register_op(OpSpec(_fn.__name__, ("a", "b"), shape=check_same, kind="elementwise", reference=_fn,
                       traits=_ELEMENTWISE))


@with_defaults("gate")
def gate(x, g, *, act, p=None, **_):
    """x * act(g)."""
    return f64(x) * ACTIVATIONS[act](f64(g))


register_op(OpSpec("gate", ("x", "g"), (Attr("act", "enum", "silu", ACTIVATION_NAMES),), shape=check_same,
                   kind="elementwise", doc="x * act(g)", reference=gate, traits=_ELEMENTWISE))


def _glu_shape(s, a):
    d = int(last(s[0]))
    if d % 2:
        raise ShapeError(f"glu needs an even number of features, got {d}", 0)
    return [tuple(s[0][:-1]) + (d // 2,)]


@with_defaults("glu")
def glu(x, *, act, p=None, **_):
    """a * act(b) where a, b are the first and second halves of the last dimension."""
    x = f64(x)
    if x.shape[-1] % 2:
        raise SeqcError(f"glu needs an even number of features, got {x.shape[-1]}")
    a, b = np.split(x, 2, axis=-1)
    return a * ACTIVATIONS[act](b)


register_op(OpSpec("glu", ("x",), (Attr("act", "enum", "sigmoid", ACTIVATION_NAMES),), shape=_glu_shape,
                   kind="elementwise", doc="a * act(b) where a, b = halves of the last dimension",
                   reference=glu, traits=_ELEMENTWISE))
