"""attention: multi-head scaled dot-product attention with q/k/v/o projections -
spec, weights, state, NumPy reference (explicit masked softmax), initialiser
(torch.nn.Linear's for each projection).

Variants, all attributes of the one op:

* ``causal`` (default true): each query sees itself and earlier keys;
  ``causal = false`` is bidirectional (every query sees every key) and has no
  state, so no ``step`` and no streaming.
* ``kv_heads``: grouped-query attention; ``k_proj``/``v_proj`` produce
  ``kv_heads * head_dim`` features and query head ``h`` reads key/value head
  ``h // (heads / kv_heads)`` (transformers' ``repeat_kv``).  0 = ``heads``.
* ``head_dim``: features per head (0 = ``d / heads``); ``q_proj`` maps ``d`` to
  ``heads * head_dim`` and ``o_proj`` back to ``d``.
* ``rope`` / ``rope_theta``: rotary position embedding applied to q and k as
  transformers' Llama does (``rotate_half``: the first and second halves of a
  head are the pairs; ``inv_freq = theta ** -(2i / head_dim)``).
* ``rope_dim = R``: partial rotary embedding (transformers' ``partial_rotary_factor``
  = R / head_dim, e.g. RecurrentGemma's 0.5): only the first R features of each
  head are rotated, as a rotary embedding of width R
  (``inv_freq = theta ** -(2i / R)``); the rest pass unchanged.  0 = head_dim.
* ``window = W``: sliding window (causal only), each query sees the last
  ``W`` keys including itself (0 = unlimited).
* ``bias`` puts a bias on all four projections; ``o_bias = true`` on ``o_proj``
  alone (RecurrentGemma's attention: bias-free q/k/v, ``o_proj`` with bias).

State (causal only): the KV cache ``k``, ``v`` of shape (B, kv_heads, T,
head_dim) (keys stored after the rotation), T = cached positions (0
initially); ``valid`` (B, T) once ragged lengths left padding in it (padding
always sits on the left: each row's real keys are contiguous and end at T);
``pos`` (B,) the number of real positions seen, with ``rope`` (the rotation
angle of the next token).  With a window the cache keeps only the last
``W - 1`` positions, all a later query can see."""
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


def dims(d: int, a: dict) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim) of an attention over `d` features with attributes `a`;
    ShapeError when they do not fit together (rope_dim included)."""
    heads, kv = a["heads"], a.get("kv_heads", 0) or a["heads"]
    hd = a.get("head_dim", 0)
    if not hd:
        if d % heads:
            raise ShapeError(f"{d} features do not divide into {heads} heads", 0)
        hd = d // heads
    if heads % kv:
        raise ShapeError(f"{heads} heads do not divide into {kv} key/value heads (kv_heads)", 0)
    rd = a.get("rope_dim", 0)
    if rd and not a.get("rope"):
        raise ShapeError(f"rope_dim = {rd} needs rope = true", None, "rope_dim")
    if rd > hd or rd % 2:
        raise ShapeError(f"rope_dim must be even and at most head_dim {hd}, got {rd}", None, "rope_dim")
    if a.get("rope") and not rd and hd % 2:
        raise ShapeError(f"rope needs an even head_dim, got {hd}", 0)
    return heads, kv, hd


def rope_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """inv_freq[i] = theta ** -(2i / head_dim), i < head_dim / 2."""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def apply_rope(x, positions, theta, rope_dim=0):
    """x (B, H, L, hd) rotated by angle positions (B, L) * inv_freq: x cos + rotate_half(x) sin,
    rotate_half(x) = [-x2, x1] for the halves x1, x2 of each head; with rope_dim only the first
    rope_dim features are rotated (a rotary embedding of that width), the rest pass."""
    rd = rope_dim or x.shape[-1]
    x, rest = x[..., :rd], x[..., rd:]
    freqs = positions[..., None] * rope_frequencies(rd, theta)          # (B, L, rd/2)
    emb = np.concatenate([freqs, freqs], -1)[:, None]                   # (B, 1, L, rd)
    half = rd // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return np.concatenate([x * np.cos(emb) + rotated * np.sin(emb), rest], -1)


def _split_heads(x, heads):
    b, length, d = x.shape
    return x.reshape(b, length, heads, d // heads).transpose(0, 2, 1, 3)     # (B, heads, L, hd)


def _softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def visible_keys(past: int, length: int, window: int, causal: bool = True) -> np.ndarray:
    """(L, past + L) bool: query i (at index past + i) sees key j."""
    j = np.arange(past + length)[None, :]
    i = past + np.arange(length)[:, None]
    if not causal:
        return np.ones((length, past + length), bool)
    return (j <= i) & (j > i - window) if window else j <= i


@with_defaults("attention")
def attention_init_state(batch, p, *, heads, kv_heads=0, head_dim=0, rope=False, causal=True, rope_dim=0,
                         **attrs):
    if not causal:
        raise SeqcError("bidirectional attention (causal = false) has no state: it needs the whole "
                        "sequence at once, so step() and streaming are not available")
    d = p["q_proj.weight"].shape[1]
    _, kv, hd = dims(d, dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, rope=rope, rope_dim=rope_dim))
    empty = np.zeros((batch, kv, 0, hd))
    state = {"k": empty, "v": empty.copy()}
    if rope:
        state["pos"] = np.zeros(batch)
    return state


@with_defaults("attention")
def attention(x, *, p, state=None, heads, bias, kv_heads=0, head_dim=0, rope=False, rope_theta=10000.0,
              window=0, causal=True, rope_dim=0, o_bias=False, **_):
    """Multi-head softmax(q k^T / sqrt(head_dim)) v with q/k/v/o projections (see the
    module docstring for the variants); `state` is a KV cache of earlier positions."""
    x = f64(x)
    batch, length, d = x.shape
    heads, kv, hd = dims(d, dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, rope=rope, rope_dim=rope_dim))
    q = _split_heads(linear(x, p=_sub(p, "q_proj"), bias=bias), heads)
    k, v = (_split_heads(linear(x, p=_sub(p, name), bias=bias), kv) for name in ("k_proj", "v_proj"))
    if not causal:
        if state is not None:
            attention_init_state(batch, p, causal=False, heads=heads)     # raises: no state
        visible, past = visible_keys(0, length, window, causal=False), 0
        cache = {}
    else:
        cache = attention_init_state(batch, p, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                     rope=rope) if state is None else state
        past = cache["k"].shape[2]
        visible = visible_keys(past, length, window)
    if rope:
        start = np.asarray(cache["pos"], np.float64) if causal else np.zeros(batch)
        positions = start[:, None] + np.arange(length)[None, :]
        q, k = apply_rope(q, positions, rope_theta, rope_dim), apply_rope(k, positions, rope_theta, rope_dim)
    if causal:
        k = np.concatenate([cache["k"], k], axis=2)
        v = np.concatenate([cache["v"], v], axis=2)
    valid = cache.get("valid")               # (B, past): cached keys that are real, not padding
    if valid is not None:
        valid = np.concatenate([valid, np.ones((batch, length), bool)], 1)
        visible = (visible[None] & valid[:, None, :])[:, None]           # (B, 1, L, T)
    group = heads // kv
    kr, vr = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)   # repeat_kv
    scores = np.where(visible, q @ kr.transpose(0, 1, 3, 2) / math.sqrt(hd), -np.inf)
    out = (_softmax(scores) @ vr).transpose(0, 2, 1, 3).reshape(batch, length, heads * hd)
    y = linear(out, p=_sub(p, "o_proj"), bias=bias or o_bias)
    if not causal:
        return y, {}
    keep = slice(max(k.shape[2] - (window - 1), 0), None) if window else slice(None)
    new = {"k": k[:, :, keep], "v": v[:, :, keep]}
    if valid is not None:
        new["valid"] = valid[:, keep]
    if rope:
        new["pos"] = np.asarray(cache["pos"], np.float64) + length
    return y, new


def _shape(s, a):
    out = seq_shape(s, a)
    dims(int(last(s[0])), a)
    return out


def _weights(s, a):
    d = int(last(s[0]))
    heads, kv, hd = dims(d, a)
    outs = {"q_proj": (heads * hd, d), "k_proj": (kv * hd, d), "v_proj": (kv * hd, d), "o_proj": (d, heads * hd)}
    w = {}
    for name, shape in outs.items():
        w[f"{name}.weight"] = shape
        if a["bias"] or (name == "o_proj" and a["o_bias"]):
            w[f"{name}.bias"] = (shape[0],)
    return w


def _state(s, a):
    if not a.get("causal", True):
        return {}
    _, kv, hd = dims(int(last(s[0])), a)
    out = {k: (kv, 0, hd) for k in ("k", "v")}     # KV cache, grows (up to window - 1)
    if a.get("rope"):
        out["pos"] = ()
    return out


def init_attention(shapes, a, rng):
    out = {}
    for name in PROJECTIONS:
        lin = init_linear({"weight": shapes[f"{name}.weight"]}, {"init": "default"}, rng)
        out.update({f"{name}.{k}": v for k, v in lin.items()})
    return out


def _validate(a):
    if a.get("window") and not a.get("causal", True):
        raise ShapeError("a sliding window needs causal attention (window with causal = false)", 0)


register_op(OpSpec("attention", ("x",), (
    Attr("heads", "int", positive=True, max=4096, doc="query heads"),
    Attr("bias", "bool", False, doc="bias on q/k/v/o projections"),
    Attr("kv_heads", "int", 0, min=0, max=4096, doc="key/value heads (grouped-query); 0 = heads"),
    Attr("head_dim", "int", 0, min=0, max=65536, doc="features per head; 0 = d / heads"),
    Attr("rope", "bool", False, doc="rotary position embedding on q and k (transformers' Llama convention)"),
    Attr("rope_theta", "float", 10000.0, positive=True, doc="rotary base"),
    Attr("rope_dim", "int", 0, min=0, doc="partial rotary: rotate only the first rope_dim features of each head "
                                          "(even, <= head_dim); 0 = head_dim"),
    Attr("o_bias", "bool", False, doc="bias on o_proj alone (bias = true puts one on all four)"),
    Attr("window", "int", 0, min=0, doc="sliding window: each query sees the last `window` keys; 0 = all"),
    Attr("causal", "bool", True, doc="false = bidirectional (no step / streaming)"),
    Attr("plan", "enum", "auto", ("auto", "recurrent")),
), shape=_shape, weights=_weights, state=_state,
   doc="multi-head scaled dot-product attention with q/k/v/o projections (causal or bidirectional, "
       "grouped-query, rotary, sliding window)",
   reference=attention, reference_init_state=attention_init_state, init=init_attention,
   plan_options=one_recurrent_plan, validate=_validate))
