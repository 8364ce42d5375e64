"""selective_ssm: Mamba's selective scan (mamba_ssm's selective_scan_ref) -
spec, shape rule, NumPy reference with its plans, Mamba's initialisers
(``mamba_A_log``, ``mamba_dt_bias``), plan options and fusion traits (a region
anchor that absorbs the silu(z) gate).

State ``x (B, D, N)``.  Plans of the reference:

* ``recurrent`` (and None / ``auto``): ``x_t = dA_t x_{t-1} + dB_t u_t`` one step at a time.
* ``scan``: chunks of ``CHUNK`` steps; within a chunk every state is written in
  closed form, ``x_t = (prod_{r<=t} dA_r) x_c + sum_{s<=t} (prod_{s<r<=t} dA_r) dB_s u_s``
  (cumulative products of dA, no division), the state carried between chunks.
"""
from __future__ import annotations

import math

import numpy as np

from ..discretization import discretizer
from ..errors import SeqcError
from ._direction import with_direction
from .base import (DT_ATTRS, PLANS, Attr, OpSpec, PlanOption, Traits, check_dt_range, eq_dim, f64, itemsize,
                   last, need_rank, register_op, with_defaults, zero_state)
from .elementwise import ACTIVATIONS, softplus_fn

CHUNK = 8           # the reference scan plan's chunk length
SCAN_CHUNK = 64     # the torch scan plan's chunk (its sequential steps, for the cost model)

# -- Mamba's initialisers (public, re-exported by seqc.init) -------------------------------


def mamba_dt_bias(D: int, dt_min: float, dt_max: float, floor: float, rng: np.random.Generator) -> np.ndarray:
    """Mamba's dt_proj bias: dt log-uniform in [dt_min, dt_max], clamped below at
    `floor`, stored as its inverse softplus dt + log(-expm1(-dt))."""
    log_dt = rng.uniform(size=D) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = np.maximum(np.exp(log_dt), floor)
    return dt + np.log(-np.expm1(-dt))


def mamba_A_log(D: int, N: int) -> np.ndarray:
    """Mamba's S4D-Real A: A_log[d, n] = log(n + 1) for every channel d."""
    return np.tile(np.log(np.arange(1.0, N + 1.0)), (D, 1))


def init_selective_ssm(shapes, a, rng):
    d, n = shapes["A_log"]
    return {"A_log": mamba_A_log(d, n), "D": np.ones(d),
            "delta_bias": mamba_dt_bias(d, a["dt_min"], a["dt_max"], a["dt_init_floor"], rng)}


# -- reference ------------------------------------------------------------------------------


@with_defaults("selective_ssm")
def selective_ssm_init_state(batch, p, **attrs):
    return zero_state("selective_ssm", batch, p["D"].shape[0], {**attrs, "d_state": p["A_log"].shape[1]})


def _recurrence(dA, dBu, C, x):
    """dA, dBu (B, L, D, N), C (B, L, N): y_t = <C_t, x_t>, one step at a time."""
    y = np.empty(dA.shape[:3])
    for t in range(dA.shape[1]):
        x = dA[:, t] * x + dBu[:, t]
        y[:, t] = np.einsum("bdn,bn->bd", x, C[:, t])
    return y, x


def _chunked(dA, dBu, C, x, chunk=CHUNK):
    """The same outputs chunk by chunk, each chunk's states in closed form from its first state."""
    ys = []
    for start in range(0, dA.shape[1], chunk):
        a, bu, c = dA[:, start:start + chunk], dBu[:, start:start + chunk], C[:, start:start + chunk]
        T = a.shape[1]
        # W[:, t, s] = prod_{s < r <= t} a_r for s <= t (1 on the diagonal), 0 above it
        W = np.zeros((a.shape[0], T, T) + a.shape[2:])
        for t in range(T):
            W[:, t, t] = 1.0
            for s in range(t):
                W[:, t, s] = W[:, t - 1, s] * a[:, t]
        prefix = np.cumprod(a, axis=1)                                    # prod_{r <= t} a_r
        states = prefix * x[:, None] + np.einsum("btsdn,bsdn->btdn", W, bu)
        ys.append(np.einsum("btdn,btn->btd", states, c))
        x = states[:, -1]
    return np.concatenate(ys, axis=1), x


_PLAN_FNS = {None: _recurrence, "auto": _recurrence, "recurrent": _recurrence, "scan": _chunked}


@with_defaults("selective_ssm")
def selective_ssm(u, delta, B, C, z=None, *, p, state=None, plan=None, discretize=None, delta_bias,
                  delta_softplus, disc, **attrs):
    """mamba_ssm's selective_scan_ref: x_t = dA_t x_{t-1} + dB_t u_t, y_t = <C_t, x_t> + D u_t,
    then y * silu(z) when z is given.  `plan`: recurrent or scan (module docstring);
    `discretize(A, B, dt) -> (Abar, Bbar)` defaults to the derived NumPy discretization of `disc`."""
    if plan not in _PLAN_FNS:
        raise SeqcError(f"selective_ssm has no plan {plan!r}; expected recurrent or scan")
    u, delta, B, C = (f64(a) for a in (u, delta, B, C))
    if delta_bias:
        delta = delta + p["delta_bias"]
    if delta_softplus:
        delta = softplus_fn(delta)
    A = -np.exp(p["A_log"])                                              # (D, N)
    if discretize is None:
        discretize = discretizer("diag", disc, "numpy")
    x = (selective_ssm_init_state(u.shape[0], p, **attrs) if state is None else state)["x"]
    dA, g = discretize(A, np.ones_like(A), delta[..., None])           # (B, L, D, N): dB = g * B_t
    dBu = g * B[:, :, None, :] * u[..., None]
    y, x = (_PLAN_FNS[plan] if u.shape[1] else _recurrence)(dA, dBu, C, f64(x))
    y = y + p["D"] * u
    if z is not None:
        y = y * ACTIVATIONS["silu"](f64(z))
    return y, {"x": x}


# -- spec -----------------------------------------------------------------------------------


def _shape(s, a):
    u, delta, b, c = s[:4]
    for k, t in enumerate(s):
        need_rank(t, 3, k, "every input (batch, length, features)")
    for k, t in ((1, delta),) + (((4, s[4]),) if len(s) > 4 else ()):
        for i in range(3):
            eq_dim(t[i], u[i], i, i, f"{('u', 'delta', 'B', 'C', 'z')[k]} does not match u", k)
    for k, t in ((2, b), (3, c)):
        for i in range(2):
            eq_dim(t[i], u[i], i, i, f"{'BC'[k - 2]} does not match u", k)
        eq_dim(t[2], a["d_state"], 2, 2, f"{'BC'[k - 2]} must have d_state features", k)
    return [tuple(u)]


def _weights(s, a):
    d, n = int(last(s[0])), a["d_state"]
    w = {"A_log": (d, n), "D": (d,)}
    if a["delta_bias"]:
        w["delta_bias"] = (d,)
    return w


def plan_options(node, ctx, m) -> list[PlanOption]:
    """Chunked scan and recurrence; no convolution face (the dynamics depend on the input)."""
    B, L, s = ctx.batch, ctx.length, itemsize(ctx)
    D, N = int(node.input_shapes[0][-1]), node.attrs["d_state"]
    elems = B * L * D * N
    why = "input-dependent (selective) dynamics have no convolution kernel"
    conv = PlanOption("conv", 0, 0, 0, 0, 0, legal=False, why=why)
    scan = PlanOption("scan", math.ceil(L / SCAN_CHUNK), elems, m["ns"]["selective"], elems * 6,
                      s * B * D * N * math.ceil(L / SCAN_CHUNK), batched=True)
    rec = PlanOption("recurrent", L * 6, elems, m["ns"]["selective"], elems * 6, s * B * D * N * L)
    return [conv, scan, rec]


def _fused(n):
    parts = []
    if n.attrs["delta_bias"]:
        parts.append("delta+bias")
    if n.attrs["delta_softplus"]:
        parts.append("softplus(delta)")
    parts += [f"discretize[{n.attrs['disc']}]", "scan", "C-contraction", "D-skip"]
    if len(n.inputs) == 5:
        parts.append("silu(z)-gate")
    return parts


register_op(with_direction(OpSpec("selective_ssm", ("u", "delta", "B", "C", "z"), (
    Attr("d_state", "int", 16, positive=True, max=4096),
    Attr("delta_bias", "bool", False, doc="add a learned bias (Mamba's dt initialisation) before softplus"),
    Attr("delta_softplus", "bool", True),
    Attr("disc", "enum", "mamba", ("mamba", "zoh", "bilinear")),
    Attr("plan", "enum", "auto", PLANS),
    *DT_ATTRS,
), optional_inputs=("z",), shape=_shape, weights=_weights,
   state=lambda s, a: {"x": (int(last(s[0])), a["d_state"])},
   doc="Mamba's selective scan with optional silu(z) gate",
   reference=selective_ssm, reference_init_state=selective_ssm_init_state, init=init_selective_ssm,
   plan_options=plan_options, validate=check_dt_range,
   traits=Traits(anchor=True, accepts_gate=True, fused=_fused,
                 discretization=lambda n: ("diag", n.attrs["disc"])))))
