"""gated_rmsnorm: Mamba-2's gated group RMSNorm (transformers' MambaRMSNormGated
with norm_before_gate=False) - spec, NumPy reference, initialiser (weight 1).

    g = x * silu(z);  g is split into ``groups`` equal groups of features;
    y = g / sqrt(mean_group(g^2) + eps) * weight
"""
from __future__ import annotations

import numpy as np

from .base import Attr, OpSpec, ShapeError, f64, last, register_op, with_defaults
from .elementwise import ACTIVATIONS


@with_defaults("gated_rmsnorm")
def gated_rmsnorm(x, z, *, p, groups, eps, **_):
    """RMSNorm of x * silu(z) over each of `groups` feature groups, times weight."""
    g = f64(x) * ACTIVATIONS["silu"](f64(z))
    parts = g.reshape(g.shape[:-1] + (groups, g.shape[-1] // groups))
    parts = parts / np.sqrt((parts ** 2).mean(axis=-1, keepdims=True) + eps)
    return parts.reshape(g.shape) * p["weight"]


def _shape(s, a):
    x, z = s
    if len(x) != len(z) or any(str(i) != str(j) for i, j in zip(x, z)):
        raise ShapeError(f"z has shape {tuple(z)}, x has {tuple(x)}: they must match", 1)
    d = last(x)
    if getattr(d, "is_number", True) and int(d) % a["groups"]:
        raise ShapeError(f"{int(d)} features do not split into groups = {a['groups']}", 0, attr="groups")
    return [tuple(x)]


register_op(OpSpec("gated_rmsnorm", ("x", "z"), (
    Attr("groups", "int", 1, positive=True, max=65536, doc="feature groups normalised separately"),
    Attr("eps", "float", 1e-6, positive=True),
), shape=_shape, kind="structural", weights=lambda s, a: {"weight": (int(last(s[0])),)},
   doc="RMSNorm of x * silu(z) per feature group, times weight (Mamba-2's gated norm)",
   reference=gated_rmsnorm, init=lambda shapes, a, rng: {"weight": np.ones(shapes["weight"][0])}))
