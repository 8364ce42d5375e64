"""gru: multi-layer torch.nn.GRU(batch_first=True) semantics, gate order r, z, n -
spec, weights (torch's names ``weight_ih_l{k}``, ``weight_hh_l{k}``,
``bias_ih_l{k}``, ``bias_hh_l{k}``, so a torch.nn.GRU state_dict loads
unchanged), state ``h (B, layers, hidden)`` (torch keeps (layers, B, hidden);
transpose to hand a state over), NumPy reference, initialiser (torch's
U(-1/sqrt(hidden), 1/sqrt(hidden)) for every weight), and its one plan.

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h
"""
from __future__ import annotations

import math

import numpy as np

from .base import Attr, OpSpec, PlanOption, f64, last, register_op, seq_shape, uniform, with_defaults, zero_state
from .elementwise import sigmoid_fn


def _gru_layer(x, w_ih, w_hh, b_ih, b_hh, h):
    """One torch.nn.GRU layer over a sequence, one step at a time."""
    y = np.empty(x.shape[:2] + (h.shape[-1],))
    for t in range(x.shape[1]):
        xr, xz, xn = np.split(x[:, t] @ w_ih.T + b_ih, 3, axis=-1)
        hr, hz, hn = np.split(h @ w_hh.T + b_hh, 3, axis=-1)
        r, z = sigmoid_fn(xr + hr), sigmoid_fn(xz + hz)
        n = np.tanh(xn + r * hn)
        h = (1.0 - z) * n + z * h
        y[:, t] = h
    return y, h


@with_defaults("gru")
def gru_init_state(batch, p, **attrs):
    return zero_state("gru", batch, p["weight_ih_l0"].shape[1], {**attrs, "hidden": p["weight_hh_l0"].shape[1]})


@with_defaults("gru")
def gru(x, *, p, state=None, layers, bias, plan=None, **attrs):
    """Multi-layer torch.nn.GRU(batch_first=True); state h of shape (B, layers, hidden)."""
    x = f64(x)
    if state is None:
        state = gru_init_state(x.shape[0], p, layers=layers, **attrs)
    hs = []
    for k in range(layers):
        b_ih, b_hh = (p[f"bias_ih_l{k}"], p[f"bias_hh_l{k}"]) if bias else (0.0, 0.0)
        x, h = _gru_layer(x, p[f"weight_ih_l{k}"], p[f"weight_hh_l{k}"], b_ih, b_hh, f64(state["h"][:, k]))
        hs.append(h)
    return x, {"h": np.stack(hs, axis=1)}


def _weights(s, a):
    d, h = int(last(s[0])), a["hidden"]
    w = {}
    for k in range(a["layers"]):
        w[f"weight_ih_l{k}"] = (3 * h, d if k == 0 else h)
        w[f"weight_hh_l{k}"] = (3 * h, h)
        if a["bias"]:
            w[f"bias_ih_l{k}"] = (3 * h,)
            w[f"bias_hh_l{k}"] = (3 * h,)
    return w


def init_gru(shapes, a, rng):
    bound = 1.0 / math.sqrt(a["hidden"])   # nn.GRU: every weight U(-1/sqrt(hidden), 1/sqrt(hidden))
    return {k: uniform(rng, bound, s) for k, s in shapes.items()}


def plan_options(node, ctx, machine) -> list[PlanOption]:
    """One plan: the fused kernel over the sequence (the recurrent face is ``step``)."""
    return [PlanOption("recurrent", 0, 0, 0, 0, 0)]


register_op(OpSpec("gru", ("x",), (
    Attr("hidden", "int", positive=True), Attr("layers", "int", 1, positive=True, max=64), Attr("bias", "bool", True),
    Attr("plan", "enum", "auto", ("auto", "recurrent")),
), shape=lambda s, a: [tuple(seq_shape(s, a)[0][:-1]) + (a["hidden"],)], weights=_weights,
   state=lambda s, a: {"h": (a["layers"], a["hidden"])},
   doc="torch.nn.GRU(batch_first=True) semantics, gate order r, z, n",
   reference=gru, reference_init_state=gru_init_state, init=init_gru, plan_options=plan_options))
