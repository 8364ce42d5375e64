"""layernorm and rmsnorm over the last dimension - specs, NumPy references,
initialiser (weight 1, bias 0)."""
from __future__ import annotations

import numpy as np

from .base import Attr, OpSpec, f64, last, register_op, same_as_first, with_defaults


@with_defaults("layernorm")
def layernorm(x, *, p, eps, bias, **_):
    x = f64(x)
    centred = x - x.mean(axis=-1, keepdims=True)
    y = centred / np.sqrt((centred ** 2).mean(axis=-1, keepdims=True) + eps) * p["weight"]
    return y + p["bias"] if bias else y


@with_defaults("rmsnorm")
def rmsnorm(x, *, p, eps, **_):
    """x / sqrt(mean(x^2) + eps) * weight, as mamba_ssm's RMSNorm."""
    x = f64(x)
    return x / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + eps) * p["weight"]


def init_norm(shapes, a, rng):
    d = shapes["weight"][0]
    return {"weight": np.ones(d), "bias": np.zeros(d)}


register_op(OpSpec("layernorm", ("x",), (Attr("eps", "float", 1e-5, positive=True), Attr("bias", "bool", True)),
                   shape=same_as_first, kind="structural",
                   weights=lambda s, a: {"weight": (int(last(s[0])),),
                                         **({"bias": (int(last(s[0])),)} if a["bias"] else {})},
                   reference=layernorm, init=init_norm))
register_op(OpSpec("rmsnorm", ("x",), (Attr("eps", "float", 1e-5, positive=True),), shape=same_as_first,
                   kind="structural", weights=lambda s, a: {"weight": (int(last(s[0])),)},
                   reference=rmsnorm, init=init_norm))
