"""conv1d: causal depthwise convolution over time (torch Conv1d groups=channels
layout), optionally followed by an activation - spec, state (the last K-1
inputs), NumPy reference, initialiser, fusion traits (a region anchor that
absorbs a following activation)."""
from __future__ import annotations

import math

import numpy as np

from .base import (ACTIVATION_NAMES, Attr, OpSpec, Traits, f64, last, register_op, seq_shape, step_of, uniform,
                   with_defaults, zero_state)
from .elementwise import ACTIVATIONS


@with_defaults("conv1d")
def conv1d_init_state(batch, p, **attrs):
    return zero_state("conv1d", batch, p["weight"].shape[0], {**attrs, "kernel": p["weight"].shape[-1]})


@with_defaults("conv1d")
def conv1d(x, *, p, state=None, bias, activation, **_):
    """Causal depthwise convolution over time, torch Conv1d(groups=D, padding=K-1)
    keeping the first L outputs: y[t, d] = sum_k w[d, 0, k] x[t - (K-1) + k, d].
    State ``window (B, D, K-1)``: the last K-1 inputs, oldest first."""
    x = f64(x)
    batch, length, _d = x.shape
    w = p["weight"][:, 0, :]                                   # (D, K)
    window = (conv1d_init_state(batch, p) if state is None else state)["window"]
    padded = np.concatenate([window.transpose(0, 2, 1), x], axis=1)   # (B, K-1+L, D)
    y = np.zeros(x.shape)
    for k in range(w.shape[1]):
        y = y + padded[:, k:k + length, :] * w[:, k]
    if bias:
        y = y + p["bias"]
    return ACTIVATIONS[activation](y), {"window": padded[:, length:, :].transpose(0, 2, 1).copy()}


def init_conv1d(shapes, a, rng):
    d, _, k = shapes["weight"]
    bound = 1.0 / math.sqrt(k)           # nn.Conv1d(groups=d): fan_in = kernel size
    return {"weight": uniform(rng, bound, (d, 1, k)), "bias": uniform(rng, bound, d)}


def _weights(s, a):
    d = int(last(s[0]))
    return {"weight": (d, 1, a["kernel"]), **({"bias": (d,)} if a["bias"] else {})}


def _fused(n):
    return ["causal-conv", "bias"] + ([n.attrs["activation"]] if n.attrs["activation"] != "identity" else [])


register_op(OpSpec("conv1d", ("x",), (
    Attr("kernel", "int", 4, positive=True, max=4096),
    Attr("bias", "bool", True),
    Attr("activation", "enum", "identity", ACTIVATION_NAMES),
), shape=seq_shape, weights=_weights,
   state=lambda s, a: {"window": (int(last(s[0])), a["kernel"] - 1)},
   time_invariant=True, doc="causal depthwise convolution over time (torch Conv1d groups=channels layout)",
   reference=conv1d, reference_step=step_of(conv1d), reference_init_state=conv1d_init_state, init=init_conv1d,
   traits=Traits(anchor=True, fused=_fused, accepts_activation=True, time_invariant=True)))
