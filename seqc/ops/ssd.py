"""ssd: Mamba-2's state-space dual layer (Dao & Gu, "Transformers are SSMs:
Generalized Models and Efficient Algorithms Through Structured State Space
Duality", 2024) - spec, shape rule, weights (transformers' Mamba2 names
``A_log``, ``dt_bias``, ``D``, one value per head), state, NumPy reference with
both faces of the duality as plans, initialiser, plan options and cost model.

Inputs ``x (B, L, heads * head_dim)``, ``dt (B, L, heads)``, ``B`` and ``C``
``(B, L, n_groups * d_state)``; head ``h`` reads group ``h // (heads / n_groups)``.
With ``dt <- softplus(dt + dt_bias)`` and ``a = -exp(A_log)`` (one scalar per head),
per head::

    h_t = exp(dt_t a) h_{t-1} + dt_t x_t B_t^T          h (head_dim, d_state)
    y_t = h_t C_t + D x_t

State ``ssm (B, heads, head_dim, d_state)``.  Plans of the reference:

* ``recurrent`` (and None / ``auto``): the recurrence above, one step at a time.
* ``scan``: the chunked SSD form.  Within a chunk of ``chunk`` steps the output
  is a masked attention-like product ``y = (L o C B^T) (dt x)`` with the
  1-semiseparable decay ``L[t, s] = exp(sum_{s<r<=t} dt_r a)``; the state is
  carried from chunk to chunk (``h_end = exp(sum dt a) h_start + sum_s
  exp(sum_{s<r} dt_r a) dt_s x_s B_s^T``) and read by each chunk's outputs
  through ``exp(sum_{r<=t} dt_r a) C_t h_start``.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import SeqcError
from .base import (DT_ATTRS, Attr, OpSpec, PlanOption, ShapeError, Traits, check_dt_range, eq_dim, f64, itemsize,
                   last, need_rank, register_op, with_defaults)
from .elementwise import softplus_fn
from .selective_ssm import mamba_dt_bias

PLANS = ("auto", "scan", "recurrent")
# cost model: the torch chunked plan's fixed number of batched ops, plus two per chunk for the
# chunk-to-chunk recurrence; ops per time step of the recurrence (fitted with benchmarks/bench_mamba2.py)
BATCHED_OPS = 40
STEP_OPS = 8


def init_ssd(shapes, a, rng):
    """transformers' Mamba2 initialisation: A = 1..heads, D = 1, dt log-uniform in [dt_min, dt_max]."""
    heads = shapes["A_log"][0]
    return {"A_log": np.log(np.arange(1.0, heads + 1.0)), "D": np.ones(heads),
            "dt_bias": mamba_dt_bias(heads, a["dt_min"], a["dt_max"], a["dt_init_floor"], rng)}


# -- reference ------------------------------------------------------------------------------


@with_defaults("ssd")
def ssd_init_state(batch, p, *, head_dim, d_state, **_):
    return {"ssm": np.zeros((batch, p["A_log"].shape[0], head_dim, d_state))}


def _recurrence(x, dt, a, B, C, h):
    """x (b, L, H, P), dt (b, L, H), a (H,), B, C (b, L, H, N), h (b, H, P, N)."""
    y = np.empty(x.shape)
    for t in range(x.shape[1]):
        decay = np.exp(dt[:, t] * a)                                          # (b, H)
        h = decay[..., None, None] * h + np.einsum("bhp,bhn->bhpn", dt[:, t, :, None] * x[:, t], B[:, t])
        y[:, t] = np.einsum("bhpn,bhn->bhp", h, C[:, t])
    return y, h


def _chunked(x, dt, a, B, C, h, chunk):
    """The same outputs by the chunked SSD form (module docstring)."""
    ys = []
    for start in range(0, x.shape[1], chunk):
        xs, d, b_, c_ = (t[:, start:start + chunk] for t in (x, dt, B, C))
        cs = np.cumsum(d * a, axis=1)                                         # (b, T, H): sum_{r<=t} dt_r a
        T = xs.shape[1]
        seg = cs[:, :, None, :] - cs[:, None, :, :]                           # (b, t, s, H)
        causal = np.tril(np.ones((T, T), dtype=bool))[None, :, :, None]
        decay = np.where(causal, np.exp(np.where(causal, seg, 0.0)), 0.0)   # L[t, s]
        scores = np.einsum("btHn,bsHn->btsH", c_, b_) * decay                  # (L o C B^T)
        y_diag = np.einsum("btsH,bsH,bsHp->btHp", scores, d, xs)
        y_off = np.exp(cs)[..., None] * np.einsum("btHn,bHpn->btHp", c_, h)
        to_end = np.exp(cs[:, -1:] - cs) * d                                  # (b, T, H)
        h = (np.exp(cs[:, -1])[..., None, None] * h
             + np.einsum("bsH,bsHp,bsHn->bHpn", to_end, xs, b_))
        ys.append(y_diag + y_off)
    return np.concatenate(ys, axis=1), h


@with_defaults("ssd")
def ssd(x, dt, B, C, *, p, state=None, plan=None, d_state, n_groups, chunk, dt_softplus, **_):
    """Mamba-2's SSD layer (module docstring); `plan`: recurrent or scan (the chunked form)."""
    if plan not in (None, "auto", "recurrent", "scan"):
        raise SeqcError(f"ssd has no plan {plan!r}; expected recurrent or scan")
    x, dt, B, C = (f64(t) for t in (x, dt, B, C))
    b, L, d_inner = x.shape
    heads = dt.shape[-1]
    P = d_inner // heads
    dt = dt + p["dt_bias"]
    if dt_softplus:
        dt = softplus_fn(dt)
    a = -np.exp(p["A_log"])
    xh = x.reshape(b, L, heads, P)
    Bh, Ch = (np.repeat(t.reshape(b, L, n_groups, d_state), heads // n_groups, axis=2) for t in (B, C))
    h = np.zeros((b, heads, P, d_state)) if state is None else f64(state["ssm"])
    if plan == "scan" and L:
        y, h = _chunked(xh, dt, a, Bh, Ch, h, chunk)
    else:
        y, h = _recurrence(xh, dt, a, Bh, Ch, h)
    y = y + p["D"][:, None] * xh
    return y.reshape(b, L, d_inner), {"ssm": h}


# -- spec -----------------------------------------------------------------------------------


def _shape(s, a):
    for k, t in enumerate(s):
        need_rank(t, 3, k, "every input (batch, length, features)")
    x = s[0]
    for k in (1, 2, 3):
        for i in range(2):
            eq_dim(s[k][i], x[i], i, i, f"{('x', 'dt', 'B', 'C')[k]} does not match x", k)
    d_inner, heads = last(x), last(s[1])
    if getattr(d_inner, "is_number", True) and getattr(heads, "is_number", True):
        d_inner, heads = int(d_inner), int(heads)
        if d_inner != heads * a["head_dim"]:
            raise ShapeError(f"x has {d_inner} features; expected heads * head_dim = {heads} * {a['head_dim']} "
                             f"(heads = dt's features)", 0, attr="head_dim")
        if heads % a["n_groups"]:
            raise ShapeError(f"{heads} heads (dt's features) do not divide into n_groups = {a['n_groups']}",
                             1, attr="n_groups")
    for k in (2, 3):
        eq_dim(s[k][2], a["n_groups"] * a["d_state"], 2, 2,
               f"{'BC'[k - 2]} must have n_groups * d_state = {a['n_groups'] * a['d_state']} features", k)
    return [tuple(x)]


def _weights(s, a):
    heads = int(last(s[1]))
    return {"A_log": (heads,), "dt_bias": (heads,), "D": (heads,)}


def _state(s, a):
    return {"ssm": (int(last(s[1])), a["head_dim"], a["d_state"])}


def _numbers(node):
    heads, d_inner = int(node.input_shapes[1][-1]), int(node.input_shapes[0][-1])
    return heads, d_inner // heads, node.attrs["n_groups"], node.attrs["d_state"]


def plan_options(node, ctx, m) -> list[PlanOption]:
    """Both faces of the duality.  The chunked form runs a fixed set of batched
    matmuls (its cost is the work it materialises: chunk x chunk scores per
    head, the chunk states and the outputs); the recurrence takes ``L`` dependent
    steps, each touching the whole state (B, heads, head_dim, d_state)."""
    B, L, s = ctx.batch, ctx.length, itemsize(ctx)
    H, P, G, N = _numbers(node)
    Q = node.attrs["chunk"]
    chunks = math.ceil(L / Q)
    state = B * H * P * N
    scores = B * chunks * Q * Q * (H + G)                   # decay mask per head + C B^T per group
    elems = scores + 3 * B * chunks * Q * H * P + 2 * state * chunks + B * H * chunks ** 2 * P * N / max(Q, 1)
    ns = m["ns"]
    scan = PlanOption("scan", BATCHED_OPS + 2 * chunks, elems, ns.get("ssd", ns["conv"]),
                      2 * B * chunks * Q * Q * (G * N + H * P) + 4 * B * L * H * P * N,
                      s * elems, batched=True)
    rec = PlanOption("recurrent", L * STEP_OPS, 3 * B * L * H * P * N, ns["selective"], 4 * B * L * H * P * N,
                     s * state * L)
    conv = PlanOption("conv", 0, 0, 0, 0, 0, legal=False,
                      why="input-dependent (selective) decay has no convolution kernel")
    return [conv, scan, rec]


def _fused(n):
    parts = ["dt+dt_bias"] + (["softplus(dt)"] if n.attrs["dt_softplus"] else [])
    return parts + ["exp(dt*A)", "ssd", "C-contraction", "D-skip"]


register_op(OpSpec("ssd", ("x", "dt", "B", "C"), (
    Attr("head_dim", "int", positive=True, max=65536, doc="features per head (x has heads * head_dim)"),
    Attr("d_state", "int", 64, positive=True, max=4096),
    Attr("n_groups", "int", 1, positive=True, max=4096, doc="groups of heads sharing B and C"),
    Attr("chunk", "int", 64, positive=True, max=4096, doc="chunk length of the chunked (scan) plan"),
    Attr("dt_softplus", "bool", True, doc="dt <- softplus(dt + dt_bias)"),
    Attr("plan", "enum", "auto", PLANS),
    *DT_ATTRS,
), shape=_shape, weights=_weights, state=_state,
   doc="Mamba-2's state-space dual (SSD) layer: multi-head, scalar decay per head, grouped B and C, D skip",
   reference=ssd, reference_init_state=ssd_init_state, init=init_ssd, plan_options=plan_options, validate=check_dt_range,
   traits=Traits(anchor=True, fused=_fused)))
