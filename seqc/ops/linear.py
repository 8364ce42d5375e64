"""linear: y = x W^T + b over the last dimension (torch.nn.Linear layout) -
spec, NumPy reference and initialisers (torch's default, Mamba's dt_proj, zeros)."""
from __future__ import annotations

import math

import numpy as np

from .base import DT_ATTRS, Attr, OpSpec, check_dt_range, f64, last, register_op, uniform, with_defaults
from .selective_ssm import mamba_dt_bias


@with_defaults("linear")
def linear(x, *, p, bias, **_):
    """x W^T + b over the last dimension (torch.nn.Linear layout)."""
    y = f64(x) @ p["weight"].T
    return y + p["bias"] if bias else y


def init_linear(shapes, a, rng):
    out_f, in_f = shapes["weight"]
    if a["init"] == "zeros":
        return {"weight": np.zeros((out_f, in_f)), "bias": np.zeros(out_f)}
    if a["init"] == "mamba_dt":          # mamba_ssm dt_proj, dt_init="random", dt_scale=1
        return {"weight": uniform(rng, in_f ** -0.5, (out_f, in_f)),
                "bias": mamba_dt_bias(out_f, a["dt_min"], a["dt_max"], a["dt_init_floor"], rng)}
    bound = 1.0 / math.sqrt(in_f)        # nn.Linear: kaiming_uniform(a=sqrt(5)) and its bias rule
    return {"weight": uniform(rng, bound, (out_f, in_f)), "bias": uniform(rng, bound, out_f)}


register_op(OpSpec("linear", ("x",), (
    Attr("out", "int", positive=True, doc="output features"),
    Attr("bias", "bool", True),
    Attr("init", "enum", "default", ("default", "mamba_dt", "zeros"), init_only=True,
         doc="default: torch.nn.Linear; mamba_dt: Mamba's dt_proj (weight ±dt_rank^-0.5, bias inverse-softplus dt)"),
    *DT_ATTRS,
    Attr("tie", "layer", "", doc="another layer (named by its value, e.g. tie = embeddings) whose `weight` of the "
                                 "same shape this linear uses: stored once, under that layer's key"),
), shape=lambda s, a: [tuple(s[0][:-1]) + (a["out"],)],
   weights=lambda s, a: {"weight": (a["out"], int(last(s[0]))), **({"bias": (a["out"],)} if a["bias"] else {})},
   doc="y = x W^T + b over the last dimension", reference=linear, init=init_linear, validate=check_dt_range))
