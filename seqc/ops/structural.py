"""Structural ops: split and concat over the last dimension (specs, shape
rules, NumPy references, and when each merely forwards its input)."""
from __future__ import annotations

import numpy as np

from .base import Attr, OpSpec, ShapeError, Traits, eq_dim, f64, last, register_op, split_sizes


def _split_shape(s, a):
    return [tuple(s[0][:-1]) + (k,) for k in split_sizes(last(s[0]), a["sizes"])]


def split(x, *, sizes, p=None, **_):
    """Split the last dimension: `sizes` is a number of equal parts or a list of sizes."""
    x = f64(x)
    return tuple(np.split(x, np.cumsum(split_sizes(x.shape[-1], sizes))[:-1], axis=-1))


def _split_identity(node):
    sizes = node.attrs["sizes"]
    return node.inputs[0] if sizes == 1 or (isinstance(sizes, list) and len(sizes) == 1) else None


register_op(OpSpec("split", ("x",), (Attr("sizes", "sizes", doc="a number of equal parts or a list of sizes"),),
                   shape=_split_shape, kind="structural", doc="split the last dimension", reference=split,
                   traits=Traits(identity=_split_identity)))


def _concat_shape(s, a):
    base = s[0]
    for k, t in enumerate(s[1:], 1):
        if len(t) != len(base):
            raise ShapeError(f"operands have {len(base)} and {len(t)} dimensions", k)
        for i in range(len(base) - 1):
            eq_dim(t[i], base[i], i, i, f"operand {k + 1} does not match operand 1", k)
    return [tuple(base[:-1]) + (sum(int(t[-1]) for t in s),)]


def concat(*xs, p=None, **_):
    return np.concatenate([f64(x) for x in xs], axis=-1)


register_op(OpSpec("concat", ("x",), shape=_concat_shape, variadic=True, kind="structural",
                   doc="concatenate along the last dimension", reference=concat,
                   traits=Traits(identity=lambda node: node.inputs[0] if len(node.inputs) == 1 else None)))
