"""embedding: rows of a (vocab, dim) table for integer tokens - spec, NumPy
reference, initialiser (N(0, 1), torch.nn.Embedding's)."""
from __future__ import annotations

import numpy as np

from ..errors import SeqcError
from .base import Attr, OpSpec, f64, need_rank, register_op


def embedding(tokens, *, p, **_):
    """Rows of the (vocab, dim) table for integer tokens."""
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise SeqcError(f"embedding needs integer tokens, got {tokens.dtype}")
    vocab = p["weight"].shape[0]
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        raise SeqcError(f"token ids must lie in [0, {vocab}), got range [{tokens.min()}, {tokens.max()}]")
    return f64(p["weight"])[tokens]


def _shape(s, a):
    need_rank(s[0], 2, 0, "tokens (batch, length)")
    return [tuple(s[0]) + (a["dim"],)]


register_op(OpSpec("embedding", ("tokens",), (Attr("vocab", "int", positive=True), Attr("dim", "int", positive=True)),
                   shape=_shape, weights=lambda s, a: {"weight": (a["vocab"], a["dim"])}, int_input=True,
                   kind="structural", reference=embedding,
                   init=lambda shapes, a, rng: {"weight": rng.standard_normal(shapes["weight"])}))
