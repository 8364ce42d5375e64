"""lstm: multi-layer torch.nn.LSTM(batch_first=True) semantics, gate order i, f, g, o -
spec, weights (torch's names), state ``h``, ``c`` of shape (B, layers, hidden)
(torch keeps (layers, B, hidden); transpose to hand a state over), NumPy
reference, initialiser (torch's U(-1/sqrt(hidden), 1/sqrt(hidden)))."""
from __future__ import annotations

import math

import numpy as np

from .base import Attr, OpSpec, PlanOption, f64, last, register_op, seq_shape, uniform, with_defaults, zero_state
from .elementwise import sigmoid_fn


def _lstm_layer(x, w_ih, w_hh, b, h, c):
    """One torch.nn.LSTM layer over a sequence, gate order i, f, g, o."""
    y = np.empty(x.shape[:2] + (h.shape[-1],))
    for t in range(x.shape[1]):
        i, f, g, o = np.split(x[:, t] @ w_ih.T + h @ w_hh.T + b, 4, axis=-1)
        c = sigmoid_fn(f) * c + sigmoid_fn(i) * np.tanh(g)
        h = sigmoid_fn(o) * np.tanh(c)
        y[:, t] = h
    return y, h, c


@with_defaults("lstm")
def lstm_init_state(batch, p, **attrs):
    hidden = p["weight_hh_l0"].shape[1]
    return zero_state("lstm", batch, p["weight_ih_l0"].shape[1], {**attrs, "hidden": hidden})


@with_defaults("lstm")
def lstm(x, *, p, state=None, layers, bias, **attrs):
    """Multi-layer torch.nn.LSTM(batch_first=True); state h, c of shape (B, layers, hidden)."""
    x = f64(x)
    attrs.pop("plan", None)
    if state is None:
        state = lstm_init_state(x.shape[0], p, layers=layers, **attrs)
    hs, cs = [], []
    for k in range(layers):
        b = p[f"bias_ih_l{k}"] + p[f"bias_hh_l{k}"] if bias else 0.0
        x, h, c = _lstm_layer(x, p[f"weight_ih_l{k}"], p[f"weight_hh_l{k}"], b, state["h"][:, k], state["c"][:, k])
        hs.append(h)
        cs.append(c)
    return x, {"h": np.stack(hs, axis=1), "c": np.stack(cs, axis=1)}


def _weights(s, a):
    d, h = int(last(s[0])), a["hidden"]
    w = {}
    for k in range(a["layers"]):
        w[f"weight_ih_l{k}"] = (4 * h, d if k == 0 else h)
        w[f"weight_hh_l{k}"] = (4 * h, h)
        if a["bias"]:
            w[f"bias_ih_l{k}"] = (4 * h,)
            w[f"bias_hh_l{k}"] = (4 * h,)
    return w


def init_lstm(shapes, a, rng):
    bound = 1.0 / math.sqrt(a["hidden"])   # nn.LSTM: every weight U(-1/sqrt(hidden), 1/sqrt(hidden))
    return {k: uniform(rng, bound, s) for k, s in shapes.items()}


def one_recurrent_plan(node, ctx, machine) -> list[PlanOption]:
    """One plan: the fused kernel over the sequence (the recurrent face is ``step``)."""
    return [PlanOption("recurrent", 0, 0, 0, 0, 0)]


register_op(OpSpec("lstm", ("x",), (
    Attr("hidden", "int", positive=True), Attr("layers", "int", 1, positive=True, max=64), Attr("bias", "bool", True),
    Attr("plan", "enum", "auto", ("auto", "recurrent")),
), shape=lambda s, a: [tuple(seq_shape(s, a)[0][:-1]) + (a["hidden"],)], weights=_weights,
   state=lambda s, a: {"h": (a["layers"], a["hidden"]), "c": (a["layers"], a["hidden"])},
   doc="torch.nn.LSTM(batch_first=True) semantics, gate order i, f, g, o",
   reference=lstm, reference_init_state=lstm_init_state, init=init_lstm, plan_options=one_recurrent_plan))
