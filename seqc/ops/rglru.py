"""rglru: the Real-Gated Linear Recurrent Unit of Griffin / RecurrentGemma (De et
al., "Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient
Language Models", 2024, Sec. 2.4) - spec, weights (transformers'
``RecurrentGemmaRglru`` names, so its state_dict loads unchanged), state, NumPy
reference with its plans, initialiser, plan options.

With ``H`` heads of width ``w = D / H``, gate weights block-diagonal per head
(``x_h @ W_h``, a (w, w) matrix per head, not transposed like nn.Linear)::

    r_t = sigmoid(x_t W_a + b_a)            recurrent_gate_weight / _bias
    i_t = sigmoid(x_t W_x + b_x)            input_gate_weight / _bias
    log a_t = -c * r_t * softplus(recurrent_param)        (c = 8)
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)
    y_t = h_t

The paper writes ``a = sigmoid(Lambda)``; transformers stores ``recurrent_param
= -Lambda`` (``log a = -softplus(recurrent_param)``); we follow transformers.

``reset`` (default true, RecurrentGemma's convention): the first token after a
fresh state starts a document - its input is not normalised and the previous
state is dropped (``h = i * x``).  The state then carries ``started (B, 1)``
(0 before the first token, 1 after), so ``step`` from ``init_state`` equals
``forward``.  With ``reset = false`` it is the paper's recurrence throughout
and the state is ``h (B, D)`` alone.

Plans of the reference: ``recurrent`` (one step at a time) and ``scan`` (chunks
of ``CHUNK`` steps, each state in closed form from cumulative sums of log a).
The torch ``scan`` plan is a recursive-doubling scan (backends/torch/ops/rglru.py).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import SeqcError
from ._direction import with_direction
from .base import (Attr, OpSpec, PlanOption, ShapeError, f64, itemsize, last, register_op, seq_shape,
                   with_defaults, zero_state)
from .elementwise import sigmoid_fn, softplus_fn

CHUNK = 8            # the reference scan plan's chunk length


def gates(x, p, heads, c):
    """(log a_t, normalised input) for x (B, L, D): the gate math shared by both plans."""
    batch, length, d = x.shape
    xh = x.reshape(batch, length, heads, d // heads)
    gate_x = sigmoid_fn(np.einsum("blhi,hij->blhj", xh, p["input_gate_weight"]) + p["input_gate_bias"])
    gate_a = sigmoid_fn(np.einsum("blhi,hij->blhj", xh, p["recurrent_gate_weight"]) + p["recurrent_gate_bias"])
    log_a = (-c * gate_a.reshape(x.shape)) * softplus_fn(p["recurrent_param"])
    return log_a, x * gate_x.reshape(x.shape)


def _recurrence(log_a, u, h):
    """h_t = a_t h_{t-1} + u_t, one step at a time."""
    y = np.empty(u.shape)
    for t in range(u.shape[1]):
        h = np.exp(log_a[:, t]) * h + u[:, t]
        y[:, t] = h
    return y, h


def _chunked(log_a, u, h, chunk=CHUNK):
    """The same chunk by chunk: h_t = exp(S_t) h_c + sum_{s<=t} exp(S_t - S_s) u_s, S the cumulative log a."""
    ys = []
    for start in range(0, u.shape[1], chunk):
        la, uc = log_a[:, start:start + chunk], u[:, start:start + chunk]
        S = np.cumsum(la, axis=1)                                         # (B, T, D)
        T = uc.shape[1]
        mask = np.tril(np.ones((T, T), bool))[None, :, :, None]
        W = np.exp(np.where(mask, S[:, :, None] - S[:, None, :], -np.inf))   # (B, t, s, D)
        states = np.exp(S) * h[:, None] + np.einsum("btsd,bsd->btd", W, uc)
        ys.append(states)
        h = states[:, -1]
    return np.concatenate(ys, axis=1), h


_PLAN_FNS = {None: _recurrence, "auto": _recurrence, "recurrent": _recurrence, "scan": _chunked}


@with_defaults("rglru")
def rglru_init_state(batch, p, **attrs):
    return zero_state("rglru", batch, p["recurrent_param"].shape[0], attrs)


@with_defaults("rglru")
def rglru(x, *, p, state=None, plan=None, heads, c, reset, **attrs):
    """The RG-LRU over a sequence (module docstring); returns (y, final state)."""
    if plan not in _PLAN_FNS:
        raise SeqcError(f"rglru has no plan {plan!r}; expected recurrent or scan")
    x = f64(x)
    if state is None:
        state = rglru_init_state(x.shape[0], p, heads=heads, c=c, reset=reset)
    h = f64(state["h"])
    log_a, u = gates(x, p, heads, c)
    norm = np.sqrt(-np.expm1(2.0 * log_a))                               # sqrt(1 - a^2)
    if reset and x.shape[1]:
        first = f64(state["started"])[:, 0] == 0                       # (B,) rows at a document start
        norm[first, 0] = 1.0
        h = np.where(first[:, None], 0.0, h)                          # a = 0 there: the old state is dropped
    y, h = (_PLAN_FNS[plan] if x.shape[1] else _recurrence)(log_a, u * norm, h)
    out = {"h": h}
    if reset:
        out["started"] = np.maximum(f64(state["started"]), 1.0 if x.shape[1] else 0.0)
    return y, out


# -- initialiser (transformers' RecurrentGemmaPreTrainedModel._init_weights) --------------------------


def init_rglru(shapes, a, rng):
    h, w, _ = shapes["input_gate_weight"]
    std = math.sqrt(a["w_init_variance_scale"] / w)
    # a^2 = exp(-2 softplus(param)) uniform in [0.9^2, 0.999^2]: param = log(1/sqrt(u) - 1)
    u = rng.uniform(0.9 ** 2 + 1e-8, 0.999 ** 2 + 1e-8, size=shapes["recurrent_param"])
    return {"recurrent_param": np.log(np.exp(-0.5 * np.log(u)) - 1.0),
            "input_gate_weight": rng.normal(0.0, std, (h, w, w)), "input_gate_bias": np.zeros((h, w)),
            "recurrent_gate_weight": rng.normal(0.0, std, (h, w, w)), "recurrent_gate_bias": np.zeros((h, w))}


# -- spec -----------------------------------------------------------------------------------------------


def _width(s, a):
    d = int(last(s[0]))
    if d % a["heads"]:
        raise ShapeError(f"rglru: {d} features do not split into {a['heads']} heads", 0, "heads")
    return d, d // a["heads"]


def _weights(s, a):
    d, w = _width(s, a)
    h = a["heads"]
    return {"recurrent_param": (d,), "input_gate_weight": (h, w, w), "input_gate_bias": (h, w),
            "recurrent_gate_weight": (h, w, w), "recurrent_gate_bias": (h, w)}


def _state(s, a):
    d = int(last(s[0]))
    return {"h": (d,), **({"started": (1,)} if a["reset"] else {})}


def _shape(s, a):
    _width(s, a)
    return seq_shape(s, a)


def plan_options(node, ctx, m) -> list[PlanOption]:
    """The torch scan (recursive doubling: ceil(log2 L) rounds of elementwise work over the
    whole sequence) and the recurrence (L steps)."""
    B, L, s = ctx.batch, ctx.length, itemsize(ctx)
    D = int(node.input_shapes[0][-1])
    elems = B * L * D
    rounds = max(1, math.ceil(math.log2(max(L, 2))))
    ns = m["ns"]["selective"]
    conv = PlanOption("conv", 0, 0, 0, 0, 0, legal=False, why="input-dependent decay has no convolution kernel")
    scan = PlanOption("scan", rounds * 6, elems * rounds, ns, elems * rounds * 3, s * elems * rounds * 2,
                      batched=True)
    rec = PlanOption("recurrent", L * 3, elems, ns, elems * 3, s * elems)
    return [conv, scan, rec]


register_op(with_direction(OpSpec("rglru", ("x",), (
    Attr("heads", "int", 1, positive=True, doc="blocks of the block-diagonal gate weights"),
    Attr("c", "float", 8.0, positive=True, doc="the gate's temperature: log a_t = -c r_t softplus(param)"),
    Attr("reset", "bool", True, doc="the first token of a fresh state starts a document (RecurrentGemma)"),
    Attr("plan", "enum", "auto", ("auto", "scan", "recurrent")),
    Attr("w_init_variance_scale", "float", 0.01, positive=True, init_only=True),
), shape=_shape, weights=_weights, state=_state,
   doc="Griffin's Real-Gated Linear Recurrent Unit (transformers RecurrentGemmaRglru)",
   reference=rglru, reference_init_state=rglru_init_state, init=init_rglru, plan_options=plan_options)))
