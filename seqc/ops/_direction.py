"""Bidirectional variants of causal sequence ops, for encoders: ``with_direction(spec)``
adds the attribute ``direction = causal | bidirectional`` to an op.

A bidirectional layer is the sum of two causal passes with separate parameters,
a forward pass over the sequence and a pass over the time-reversed sequence
whose output is reversed back::

    y = f(x; theta) + flip(f(flip(x); theta_reverse))

This is the "add" combination with separate parameters of Vision Mamba's
bidirectional Mamba (Zhu et al., 2024: forward and backward SSMs, outputs summed)
and of Hydra's "Add" baseline (Hwang et al., 2024).  The reverse parameters are
the op's own weights under the prefix ``reverse.`` (``reverse.A_log``,
``reverse.D``, ...), initialised by the op's initialiser with independent draws.
With ``lengths=`` each sequence is reversed within its own length.

A bidirectional layer reads the whole sequence: it has no recurrent face, so
``init_state`` / ``step`` / a carried state are refused with a SeqcError.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from ..errors import SeqcError
from .base import Attr, OpSpec

DIRECTION = Attr("direction", "enum", "causal", ("causal", "bidirectional"),
                 doc="bidirectional: forward pass + time-reversed pass with separate parameters (reverse.*), summed")
PREFIX = "reverse."


def is_bidirectional(attrs: dict) -> bool:
    return attrs.get("direction", "causal") == "bidirectional"


def refuse(op: str, what: str):
    raise SeqcError(f"{op} with direction = bidirectional has no {what}: it reads the whole sequence "
                    f"(no causal face); use direction = causal for step / streaming")


def split_params(p: dict) -> tuple[dict, dict]:
    """(forward weights, reverse weights without the prefix)."""
    return ({k: v for k, v in p.items() if not k.startswith(PREFIX)},
            {k[len(PREFIX):]: v for k, v in p.items() if k.startswith(PREFIX)})


def with_direction(spec: OpSpec) -> OpSpec:
    """`spec` with the ``direction`` attribute and its bidirectional weights, reference and initialiser."""
    name, weights, reference, init = spec.name, spec.weights, spec.reference, spec.init
    init_state, step = spec.reference_init_state, spec.reference_step

    def both_weights(s, a):
        w = weights(s, a)
        return {**w, **{PREFIX + k: v for k, v in w.items()}} if is_bidirectional(a) else w

    @functools.wraps(reference)
    def both_reference(*inputs, p, state=None, **attrs):
        if not is_bidirectional(attrs):
            return reference(*inputs, p=p, state=state, **attrs)
        if state is not None:
            refuse(name, "recurrent state")
        fwd, rev = split_params(p)
        named = {k: attrs.pop(k) for k in spec.inputs if k in attrs}        # inputs given by keyword
        attrs = {**attrs, "direction": "causal"}
        y, _ = reference(*inputs, p=fwd, **named, **attrs)
        flip = lambda t: None if t is None else np.asarray(t)[:, ::-1]     # noqa: E731
        y_rev, _ = reference(*map(flip, inputs), p=rev, **{k: flip(v) for k, v in named.items()}, **attrs)
        return y + y_rev[:, ::-1], {}

    def both_init(shapes, a, rng):
        if not is_bidirectional(a):
            return init(shapes, a, rng)
        fwd, rev = split_params(shapes)
        return {**init(fwd, a, rng), **{PREFIX + k: v for k, v in init(rev, a, rng).items()}}

    def guard(fn, what):
        @functools.wraps(fn)
        def call(*args, **attrs):
            if is_bidirectional(attrs):
                refuse(name, what)
            return fn(*args, **attrs)
        return call

    return dataclasses.replace(
        spec, attrs=spec.attrs + (DIRECTION,), weights=both_weights, reference=both_reference,
        init=init and both_init, reference_init_state=init_state and guard(init_state, "init_state"),
        reference_step=step and guard(step, "step"))
