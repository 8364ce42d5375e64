"""attention: causal multi-head scaled dot-product attention with q/k/v/o
projections - spec, weights, KV-cache state ``k``, ``v`` of shape (B, heads, T,
head_dim) (T = positions seen so far, 0 initially; plus ``valid (B, T)`` once
ragged lengths left padding), NumPy reference (explicit causal softmax),
initialiser (torch.nn.Linear's for each projection)."""
from __future__ import annotations

import math

import numpy as np

from ..errors import SeqcError
from .base import Attr, OpSpec, ShapeError, f64, last, register_op, seq_shape, with_defaults
from .linear import init_linear, linear
from .lstm import one_recurrent_plan

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _sub(p: dict, prefix: str) -> dict:
    """The weights under `prefix.` with the prefix removed (the projections)."""
    return {k[len(prefix) + 1:]: v for k, v in p.items() if k.startswith(prefix + ".")}


def _head_dim(p, heads):
    d = p["q_proj.weight"].shape[0]
    if d % heads:
        raise SeqcError(f"{d} features do not divide into {heads} heads")
    return d // heads


def _split_heads(x, heads):
    b, length, d = x.shape
    return x.reshape(b, length, heads, d // heads).transpose(0, 2, 1, 3)     # (B, heads, L, hd)


def _softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@with_defaults("attention")
def attention_init_state(batch, p, *, heads, **_):
    empty = np.zeros((batch, heads, 0, _head_dim(p, heads)))
    return {"k": empty, "v": empty.copy()}


@with_defaults("attention")
def attention(x, *, p, state=None, heads, bias, **_):
    """Causal multi-head softmax(q k^T / sqrt(head_dim)) v with q/k/v/o projections;
    `state` is a KV cache of earlier positions, which every query may see."""
    x = f64(x)
    batch, length, d = x.shape
    hd = _head_dim(p, heads)
    q, k, v = (_split_heads(linear(x, p=_sub(p, name), bias=bias), heads) for name in PROJECTIONS[:3])
    cache = attention_init_state(batch, p, heads=heads) if state is None else state
    k = np.concatenate([cache["k"], k], axis=2)
    v = np.concatenate([cache["v"], v], axis=2)
    past = cache["k"].shape[2]
    visible = np.arange(past + length)[None, :] <= past + np.arange(length)[:, None]   # (L, T)
    valid = cache.get("valid")               # (B, past): cached keys that are real, not padding
    if valid is not None:
        visible = visible[None] & np.concatenate([valid, np.ones((batch, length), bool)], 1)[:, None, :]
        visible = visible[:, None]           # (B, 1, L, T)
    scores = np.where(visible, q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd), -np.inf)
    out = (_softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(batch, length, d)
    new = {"k": k, "v": v}
    if valid is not None:
        new["valid"] = np.concatenate([valid, np.ones((batch, length), bool)], 1)
    return linear(out, p=_sub(p, "o_proj"), bias=bias), new


def _shape(s, a):
    out = seq_shape(s, a)
    d = int(last(s[0]))
    if d % a["heads"]:
        raise ShapeError(f"{d} features do not divide into {a['heads']} heads", 0)
    return out


def _weights(s, a):
    d = int(last(s[0]))
    w = {}
    for name in PROJECTIONS:
        w[f"{name}.weight"] = (d, d)
        if a["bias"]:
            w[f"{name}.bias"] = (d,)
    return w


def init_attention(shapes, a, rng):
    out = {}
    for name in PROJECTIONS:
        lin = init_linear({"weight": shapes[f"{name}.weight"]}, {"init": "default"}, rng)
        out.update({f"{name}.{k}": v for k, v in lin.items()})
    return out


register_op(OpSpec("attention", ("x",), (
    Attr("heads", "int", positive=True, max=4096), Attr("bias", "bool", False),
    Attr("plan", "enum", "auto", ("auto", "recurrent")),
), shape=_shape, weights=_weights,
   state=lambda s, a: {k: (a["heads"], 0, int(last(s[0])) // a["heads"]) for k in ("k", "v")},  # KV cache, grows
   doc="causal multi-head scaled dot-product attention with q/k/v/o projections",
   reference=attention, reference_init_state=attention_init_state, init=init_attention,
   plan_options=one_recurrent_plan))
