"""Elementwise math over the features of a sequence: ``exp``, ``sqrt``,
``softmax`` (over the last dimension), ``rms`` (x / sqrt(mean(x^2) + eps) over
the last dimension, RMSNorm without a weight, as FalconMamba's mixer norms),
tensor ``div`` (``a / b``, equal shapes) and ``affine`` (``x * scale + shift``:
what the language's scalar x tensor arithmetic ``0.5 * x``, ``x / 4``,
``x + 1``, ``1 - x`` lowers to) - specs and NumPy references.  All are
stateless and per time step, so step, state and lengths= need nothing."""
from __future__ import annotations

import numpy as np

from .base import Attr, OpSpec, Traits, check_same, f64, register_op, same_as_first, with_defaults

_POINTWISE = Traits(epilogue_ok=True)


def exp(x, **_):
    return np.exp(f64(x))


def sqrt(x, **_):
    """sqrt; negative inputs give NaN, as torch.sqrt."""
    with np.errstate(invalid="ignore"):
        return np.sqrt(f64(x))


def softmax(x, **_):
    """exp(x - max) / sum over the last dimension (features)."""
    x = f64(x)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@with_defaults("rms")
def rms(x, *, eps, **_):
    x = f64(x)
    return x / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + eps)


def div(a, b, **_):
    with np.errstate(divide="ignore", invalid="ignore"):
        return f64(a) / f64(b)


@with_defaults("affine")
def affine(x, *, scale, shift, **_):
    return f64(x) * scale + shift


register_op(OpSpec("exp", ("x",), shape=same_as_first, kind="elementwise", doc="elementwise e^x",
                   reference=exp, traits=_POINTWISE))
register_op(OpSpec("sqrt", ("x",), shape=same_as_first, kind="elementwise",
                   doc="elementwise square root (NaN below 0)", reference=sqrt, traits=_POINTWISE))
register_op(OpSpec("softmax", ("x",), shape=same_as_first, kind="elementwise",
                   doc="softmax over the features (last dimension) of each time step", reference=softmax))
register_op(OpSpec("rms", ("x",), (Attr("eps", "float", 1e-6, positive=True),), shape=same_as_first,
                   kind="elementwise", doc="x / sqrt(mean(x^2 over features) + eps): RMSNorm without a weight",
                   reference=rms))
register_op(OpSpec("div", ("a", "b"), shape=check_same, kind="elementwise",
                   doc="a / b elementwise (the language's tensor '/'; equal shapes)", reference=div,
                   traits=_POINTWISE))
register_op(OpSpec("affine", ("x",), (Attr("scale", "float", 1.0), Attr("shift", "float", 0.0)),
                   shape=same_as_first, kind="elementwise",
                   doc="x * scale + shift (the language's scalar-tensor arithmetic: 0.5 * x, x / 4, x + 1, 1 - x)",
                   reference=affine, traits=_POINTWISE))
