"""Reductions for pooling and classification: ``mean``, ``sum``, ``max`` and
``last`` with ``dim = time | features`` - specs, NumPy references, state.

Over ``features`` the op reduces each time step's features to one
(``[B, L, d] -> [B, L, 1]``); it keeps no state.  Over ``time`` it is causal
and streams: position t holds the reduction of positions 0..t
(``[B, L, d] -> [B, L, d]``), so the last position (with ``lengths=``: the
output at position length - 1, or the final state) is the reduction of the
whole sequence - a classifier reads it there - and ``step`` continues it
token by token.  ``last`` is last-token pooling: over time its output is its
input and its state ``last`` holds the latest token's features, so with
``lengths=`` the final state is each row's token at position length - 1 (a
row of length 0 keeps the state it had); over features it is the last
feature.  State: ``sum`` (and ``count``) for sum / mean, ``max`` and
``count`` for max (count 0 = nothing seen yet), ``last`` for last."""
from __future__ import annotations

import numpy as np

from .base import OPS, Attr, OpSpec, f64, last, register_op, with_defaults

DIMS = ("time", "features")


def _shape(s, a):
    x = tuple(s[0])
    return [x if a["dim"] == "time" else x[:-1] + (1,)]


def _state(how):
    def state(s, a):
        if a["dim"] != "time":
            return {}
        d = int(last(s[0]))
        if how == "last":
            return {"last": (d,)}
        return {"max": (d,), "count": (1,)} if how == "max" else \
            {"sum": (d,), **({"count": (1,)} if how == "mean" else {})}
    return state


def _reduce(how):
    @with_defaults(how)
    def reference(x, *, p=None, state=None, dim, plan=None, **_):
        x = f64(x)
        if dim == "features":
            if how == "last":
                return x[..., -1:].copy(), {}
            fn = {"mean": np.mean, "sum": np.sum, "max": np.max}[how]
            return fn(x, axis=-1, keepdims=True), {}
        batch, length, d = x.shape
        st = {k: f64(v).copy() for k, v in (state or _init(how)(batch, p, dim, d)).items()}
        y = np.zeros_like(x)
        for t in range(length):
            if how == "last":
                st["last"] = x[:, t].copy()
                y[:, t] = x[:, t]
            elif how == "max":
                st["max"] = np.where(st["count"] > 0, np.maximum(st["max"], x[:, t]), x[:, t])
                st["count"] = st["count"] + 1
                y[:, t] = st["max"]
            else:
                st["sum"] = st["sum"] + x[:, t]
                if how == "mean":
                    st["count"] = st["count"] + 1
                    y[:, t] = st["sum"] / st["count"]
                else:
                    y[:, t] = st["sum"]
        return y, st
    reference.__name__ = reference.__qualname__ = how
    reference.__doc__ = f"{how} over time (running, causal) or over features, with the final state."
    return reference


def _init(how):
    def init_state(batch, p=None, dim="time", features=1, **_):
        if dim != "time":
            return {}
        return {k: np.zeros((batch,) + v) for k, v in _state(how)([(batch, 1, features)], {"dim": dim}).items()}
    init_state.__name__ = init_state.__qualname__ = f"{how}_init_state"
    return init_state


def _step(how):
    def step(x_t, *, p=None, state=None, **attrs):
        attrs.pop("plan", None)
        y, new = OPS[how].reference(np.asarray(x_t)[:, None], p=p, state=state, **attrs)
        return y[:, 0], new
    step.__name__ = step.__qualname__ = f"{how}_step"
    step.__doc__ = f"One time step of {how}: x_t (B, d) -> (y_t, new_state)."
    return step


for _how in ("mean", "sum", "max", "last"):
    register_op(OpSpec(
        _how, ("x",), (Attr("dim", "enum", "time", DIMS, doc="time: running over positions 0..t; features: "
                                                               "over the last dimension"),),
        shape=_shape, state=_state(_how), kind="structural", reference=_reduce(_how),
        reference_init_state=_init(_how), reference_step=_step(_how),
        doc=f"{_how} over time (causal: position t reduces 0..t; the last position is the whole sequence) "
            f"or over features ([B, L, 1])"))
