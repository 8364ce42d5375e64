"""gla: linear attention with a matrix-valued state and a decay - Gated Linear
Attention (Yang et al., "Gated Linear Attention Transformers with
Hardware-Efficient Training", 2024), RetNet's fixed per-head decay (Sun et al.,
"Retentive Network", 2023) and plain causal linear attention (Katharopoulos et
al., 2020) as the three values of ``decay`` - spec, weights, state, NumPy
reference with its plans, initialiser, plan options.

Per head (``heads`` of them; key width ``dk = key_dim / heads``, value width
``dv = value_dim / heads``), with ``q_t, k_t (dk)``, ``v_t (dv)`` rows::

    S_t = diag(alpha_t) S_{t-1} + k_t^T v_t          (S: dk x dv)
    o_t = (q_t / sqrt(dk)) S_t
    o_t = norm(o_t)                                   (per head; norm = none: unchanged)
    y_t = o_proj(concat_heads(o_t))                   (o_proj = false: concat_heads(o_t))

* ``decay = gated`` (GLA): ``log alpha_t = logsigmoid(gk_proj(x_t)) / gate_normalizer``
  with the low-rank ``gk_proj`` (``gk_proj.0``: D -> gate_rank, no bias;
  ``gk_proj.1``: gate_rank -> key_dim, with bias), as flash-linear-attention's
  GatedLinearAttention (``gate_logit_normalizer`` 16).
* ``decay = fixed`` (RetNet): ``alpha = gamma_h = 1 - 2^(-5 - h)`` for head h, no weights.
* ``decay = none``: ``alpha = 1``, causal linear attention with the identity feature map.

Projections are bias-free linears named ``q_proj``, ``k_proj``, ``v_proj``,
``o_proj`` (torch.nn.Linear layout).  ``norm`` normalises each head's output
``o_t`` (dv values) on its own: ``group`` is RetNet's GroupNorm with one group
per head, ``(o - mean(o)) / sqrt(var(o) + norm_eps)`` (biased variance, no
affine weights, as torchscale's ``group_norm``), ``rms`` divides by
``sqrt(mean(o^2) + norm_eps)``.  An output gate between the norm and the output
projection (RetNet's ``swish(X W_G) * GroupNorm(retention)``) is written in the
spec with ``o_proj = false`` (the op returns the ``value_dim`` concatenated
heads), a ``gate`` and a ``linear``: ``std/retnet_block.seq``.  State
``S (B, heads, dk, dv)``.

Plans of the reference: ``recurrent`` (the recurrence above) and ``scan``
(chunks of ``CHUNK``: within a chunk a masked (T, T) score matrix with the
decays exp(b_t - b_s), b the cumulative log alpha; between chunks the state).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import SeqcError
from .base import Attr, OpSpec, PlanOption, ShapeError, f64, itemsize, last, register_op, seq_shape, uniform, \
    with_defaults, zero_state

CHUNK = 8            # the reference chunked plan's chunk length
TORCH_CHUNK = 8      # the torch chunked plan's chunk (its (Q, Q, dk) decay tensor: 8 was fastest on CPU)
DECAYS = ("gated", "fixed", "none")


def dims(d_model: int, a: dict) -> tuple[int, int]:
    """(key_dim, value_dim): 0 means the input width."""
    return a["key_dim"] or d_model, a["value_dim"] or d_model


def retnet_log_gamma(heads: int) -> np.ndarray:
    """RetNet's per-head decays, log(1 - 2^(-5 - h))."""
    return np.log1p(-np.exp2(-5.0 - np.arange(heads)))


def _logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def projections(x, p, heads, decay, gate_normalizer):
    """q (scaled), k, v, log alpha for x (B, L, D), split into heads: (B, L, H, .)."""
    batch, length, _ = x.shape
    q, k, v = (x @ p[f"{n}.weight"].T for n in ("q_proj", "k_proj", "v_proj"))
    q, k, v = (t.reshape(batch, length, heads, -1) for t in (q, k, v))
    dk = q.shape[-1]
    q = q / math.sqrt(dk)
    if decay == "gated":
        g = (x @ p["gk_proj.0.weight"].T) @ p["gk_proj.1.weight"].T + p["gk_proj.1.bias"]
        log_alpha = _logsigmoid(g).reshape(k.shape) / gate_normalizer
    elif decay == "fixed":
        log_alpha = np.broadcast_to(retnet_log_gamma(heads)[:, None], k.shape)
    else:
        log_alpha = np.zeros(k.shape)
    return q, k, v, log_alpha


def _recurrence(q, k, v, log_alpha, S):
    o = np.empty(q.shape[:3] + (v.shape[-1],))
    for t in range(q.shape[1]):
        S = np.exp(log_alpha[:, t])[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S


def _chunked(q, k, v, log_alpha, S, chunk=CHUNK):
    outs = []
    for start in range(0, q.shape[1], chunk):
        qc, kc, vc = (t[:, start:start + chunk] for t in (q, k, v))
        b = np.cumsum(log_alpha[:, start:start + chunk], axis=1)               # (B, T, H, dk)
        T = qc.shape[1]
        mask = np.tril(np.ones((T, T), bool))[None, :, :, None, None]
        decay = np.exp(np.where(mask, b[:, :, None] - b[:, None, :], -np.inf))  # (B, t, s, H, dk)
        scores = np.einsum("bthk,bshk,btshk->bhts", qc, kc, decay)
        o = np.einsum("bhts,bshv->bthv", scores, vc) + np.einsum("bthk,bhkv->bthv", qc * np.exp(b), S)
        last_b = b[:, -1:]                                                     # (B, 1, H, dk)
        S = np.exp(last_b[:, 0])[..., None] * S + np.einsum("bshk,bshv->bhkv", kc * np.exp(last_b - b), vc)
        outs.append(o)
    return np.concatenate(outs, axis=1), S


def head_norm(o, norm, eps):
    """Each head's output (the last axis of o (B, L, H, dv)) normalised on its own."""
    if norm == "group":
        return (o - o.mean(-1, keepdims=True)) / np.sqrt(o.var(-1, keepdims=True) + eps)
    if norm == "rms":
        return o / np.sqrt((o ** 2).mean(-1, keepdims=True) + eps)
    return o


_PLAN_FNS = {None: _recurrence, "auto": _recurrence, "recurrent": _recurrence, "scan": _chunked}


@with_defaults("gla")
def gla_init_state(batch, p, **attrs):
    return zero_state("gla", batch, p["q_proj.weight"].shape[1], attrs)


@with_defaults("gla")
def gla(x, *, p, state=None, plan=None, heads, decay, gate_normalizer, norm, norm_eps, o_proj, **attrs):
    """Gated / fixed-decay / plain causal linear attention (module docstring); (y, final state)."""
    if plan not in _PLAN_FNS:
        raise SeqcError(f"gla has no plan {plan!r}; expected recurrent or scan")
    x = f64(x)
    q, k, v, log_alpha = projections(x, p, heads, decay, gate_normalizer)
    if state is None:
        state = gla_init_state(x.shape[0], p, heads=heads, decay=decay, gate_normalizer=gate_normalizer, **attrs)
    o, S = (_PLAN_FNS[plan] if x.shape[1] else _recurrence)(q, k, v, log_alpha, f64(state["S"]))
    y = head_norm(o, norm, norm_eps).reshape(x.shape[:2] + (-1,))
    return (y @ p["o_proj.weight"].T if o_proj else y), {"S": S}


# -- initialiser: torch.nn.Linear's default for every projection -------------------------------


def init_gla(shapes, a, rng):
    out = {}
    for name, shape in shapes.items():
        fan_in = shape[1] if len(shape) == 2 else shapes["gk_proj.1.weight"][1]
        out[name] = uniform(rng, 1.0 / math.sqrt(fan_in), shape)
    return out


# -- spec ----------------------------------------------------------------------------------------------


def _check(s, a):
    d = int(last(s[0]))
    kd, vd = dims(d, a)
    for what, n in (("key_dim", kd), ("value_dim", vd)):
        if n % a["heads"]:
            raise ShapeError(f"gla: {what} {n} does not split into {a['heads']} heads", 0, (what, "heads"))
    return d, kd, vd


def _weights(s, a):
    d, kd, vd = _check(s, a)
    w = {"q_proj.weight": (kd, d), "k_proj.weight": (kd, d), "v_proj.weight": (vd, d)}
    if a["o_proj"]:
        w["o_proj.weight"] = (d, vd)
    if a["decay"] == "gated":
        w.update({"gk_proj.0.weight": (a["gate_rank"], d), "gk_proj.1.weight": (kd, a["gate_rank"]),
                  "gk_proj.1.bias": (kd,)})
    return w


def _state(s, a):
    _, kd, vd = _check(s, a)
    h = a["heads"]
    return {"S": (h, kd // h, vd // h)}


def _shape(s, a):
    _, _, vd = _check(s, a)
    out = seq_shape(s, a)[0]
    return [out if a["o_proj"] else out[:-1] + (vd,)]


def plan_options(node, ctx, m) -> list[PlanOption]:
    """Chunked (matmuls within chunks, the state between them) and the recurrence."""
    B, L, s = ctx.batch, ctx.length, itemsize(ctx)
    d = int(node.input_shapes[0][-1])
    kd, vd = dims(d, node.attrs)
    h = node.attrs["heads"]
    T = min(L, TORCH_CHUNK)
    state = B * kd * vd // h
    ns = m["ns"]["selective"]
    chunked = PlanOption("scan", math.ceil(L / TORCH_CHUNK) * 8, B * L * T * kd + L // max(T, 1) * state,
                         ns / 8, B * L * T * (kd + vd) * 2, s * B * T * T * kd, batched=True)
    rec = PlanOption("recurrent", L * 4, B * L * kd * vd // h, ns, B * L * kd * vd // h * 4, s * state)
    return [chunked, rec]


register_op(OpSpec("gla", ("x",), (
    Attr("heads", "int", 1, positive=True),
    Attr("key_dim", "int", 0, min=0, doc="total key width (0: the input width)"),
    Attr("value_dim", "int", 0, min=0, doc="total value width (0: the input width)"),
    Attr("decay", "enum", "gated", DECAYS, doc="gated (GLA), fixed (RetNet), none (linear attention)"),
    Attr("gate_rank", "int", 16, positive=True, doc="rank of GLA's low-rank gate projection"),
    Attr("gate_normalizer", "float", 16.0, positive=True, doc="log alpha = logsigmoid(gate) / gate_normalizer"),
    Attr("norm", "enum", "none", ("none", "group", "rms"),
         doc="per-head normalisation of the output before o_proj: group (RetNet's GroupNorm, one group per head, "
             "no affine), rms"),
    Attr("norm_eps", "float", 1e-5, positive=True, doc="epsilon of norm"),
    Attr("o_proj", "bool", True, doc="false: no output projection; the output is the heads' concatenation "
                                     "(width value_dim), to gate and project in the spec"),
    Attr("plan", "enum", "auto", ("auto", "scan", "recurrent")),
), shape=_shape, weights=_weights, state=_state,
   doc="gated linear attention (GLA) / RetNet fixed decay / causal linear attention, matrix-valued state",
   reference=gla, reference_init_state=gla_init_state, init=init_gla, plan_options=plan_options))
