"""Bidirectional torch layers (``direction = bidirectional``, see seqc/ops/_direction.py):
``make_bidirectional(layer)`` gives a causal layer a child ``reverse`` (the same op,
causal, its own parameters ``reverse.*``) and makes its forward the sum of the
layer's own causal pass and the reverse layer's pass over the time-reversed
sequence, reversed back: ``y = f(x) + flip(f_reverse(flip(x)))``.  With
``lengths=`` each row is reversed within its own length.  ``step`` and a
carried or returned state raise SeqcError: there is no causal face."""
from __future__ import annotations

import torch

from seqc.ops._direction import refuse

from .base import check_lengths

_COPIED = ("plan", "plan_table", "region", "discretize_fn")   # compiler decisions the reverse pass shares


def flip_time(x, lengths=None):
    """x (B, L, ...) reversed along time; with lengths, each row within its first `length` positions."""
    if x is None:
        return None
    if lengths is None:
        return x.flip(1)
    t = torch.arange(x.shape[1], device=x.device)[None, :]
    index = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)           # (B, L)
    return x.gather(1, index.view(*index.shape, *(1,) * (x.dim() - 2)).expand_as(x))


def make_bidirectional(layer) -> None:
    """Turn `layer` (built causal with the op's forward weights) into the bidirectional layer."""
    cls = type(layer)
    layer.reverse = cls(layer.in_features, {**layer.attrs, "direction": "causal"})
    causal_forward = cls.forward
    op = cls.op

    def forward(*inputs, state=None, return_state=False, lengths=None):
        if state is not None or return_state:
            refuse(op, "recurrent state")
        lengths = check_lengths(lengths, inputs[0])
        for name in _COPIED:
            if name in layer.__dict__:
                setattr(layer.reverse, name, layer.__dict__[name])
        y = causal_forward(layer, *inputs, lengths=lengths)
        y_rev = layer.reverse(*(flip_time(t, lengths) for t in inputs), lengths=lengths)
        return y + flip_time(y_rev, lengths)

    def step(*args, **kwargs):
        refuse(op, "step")

    layer.forward, layer.step = forward, step
