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

_COPIED = ("plan", "plan_for", "plan_table", "region", "discretize_fn")   # compiler decisions it shares


def flip_time(x, lengths=None):
    """x (B, L, ...) reversed along time; with lengths, each row within its first `length` positions."""
    if x is None:
        return None
    if lengths is None:
        return x.flip(1)
    t = torch.arange(x.shape[1], device=x.device)[None, :]
    index = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)           # (B, L)
    return x.gather(1, index.view(*index.shape, *(1,) * (x.dim() - 2)).expand_as(x))


class Bidirectional:
    """Mixed in before a layer's class: forward = own causal pass + reversed pass of ``self.reverse``."""

    def forward(self, *inputs, state=None, return_state=False, lengths=None):
        if state is not None or return_state:
            refuse(self.op, "recurrent state")
        lengths = check_lengths(lengths, inputs[0])
        for name in _COPIED:
            if name in self.__dict__:
                setattr(self.reverse, name, self.__dict__[name])
        y = super().forward(*inputs, lengths=lengths)
        y_rev = self.reverse(*(flip_time(t, lengths) for t in inputs), lengths=lengths)
        return y + flip_time(y_rev, lengths)

    def step(self, *inputs, state=None):
        refuse(self.op, "step")


_CLASSES: dict[type, type] = {}


def bidirectional_class(cls: type) -> type:
    """``Bidirectional<cls>``, made once per layer class and kept in this module (so copies and
    pickles of a bidirectional layer find it)."""
    if cls not in _CLASSES:
        name = f"Bidirectional{cls.__name__}"
        _CLASSES[cls] = globals()[name] = type(name, (Bidirectional, cls), {"__module__": __name__,
                                                                             "__qualname__": name})
    return _CLASSES[cls]


def make_bidirectional(layer) -> None:
    """Turn `layer` (built causal with the op's forward weights) into the bidirectional layer."""
    cls = type(layer)
    layer.reverse = cls(layer.in_features, {**layer.attrs, "direction": "causal"})
    layer.__class__ = bidirectional_class(cls)
