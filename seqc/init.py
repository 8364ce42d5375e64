"""Weight initialisers, shared by every backend: seeded, deterministic, float64.

``init_weights(graph, seed)`` gives every weight of a graph, keyed exactly like
``graph.weight_shapes()``.  Each layer draws from its own generator, seeded by
``(seed, crc32(layer name))``, so adding or removing a layer leaves the others'
weights unchanged.

The structured initialisers are public so tests and users can call them:

* ``s4d_lin``, ``s4d_inv``, ``s4d_real``: the diagonal S4D initialisations of
  Gu, Gupta, Goel & Re, "On the Parameterization and Initialization of
  Diagonal State Space Models" (NeurIPS 2022).
* ``hippo_legs``: the HiPPO-LegS matrices of Gu, Dao, Ermon, Rudra & Re,
  "HiPPO: Recurrent Memory with Optimal Polynomial Projections" (NeurIPS 2020).
* ``hippo_legs_normal``: the diagonalised normal part of HiPPO-LegS (the
  "normal plus low-rank" form of Gu, Goel & Re, "Efficiently Modeling Long
  Sequences with Structured State Spaces", ICLR 2022), as S5 uses it (Smith,
  Warrington & Linderman, "Simplified State Space Layers for Sequence
  Modeling", ICLR 2023).
* ``mamba_dt_bias``, ``mamba_A_log``: Mamba's initialisation (Gu & Dao,
  "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023).

Layers without a structured initialiser follow PyTorch's defaults
(``nn.Linear``, ``nn.Conv1d``, ``nn.LSTM``, ``nn.Embedding``, norms).  Each op's
initialiser lives with its spec (``OpSpec.init`` in ``seqc.ops.<family>``, where the
structured ones above are defined); this module is the driver.
"""
from __future__ import annotations

import zlib

import numpy as np

from .errors import SeqcError
from .ir import join
from .ops import OPS
from .ops.selective_ssm import mamba_A_log, mamba_dt_bias
from .ops.ssm import hippo_legs, hippo_legs_normal, s4d_inv, s4d_lin, s4d_real

__all__ = ["init_weights", "init_layer", "layer_rng", "s4d_lin", "s4d_inv", "s4d_real", "hippo_legs",
           "hippo_legs_normal", "mamba_dt_bias", "mamba_A_log"]


def layer_rng(seed: int, name: str) -> np.random.Generator:
    """The generator of one layer: a stable function of the seed and the layer's name."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


def init_layer(op: str, shapes: dict, attrs: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The initial weights of one layer, given its weight shapes and attributes."""
    spec = OPS[op]
    if spec.init is None:
        raise SeqcError(f"op '{op}' has weights but no initialiser (OpSpec.init)")
    full = {**spec.defaults, **attrs}
    drawn = spec.init(shapes, full, rng)
    out = {}
    for k, s in shapes.items():
        w = np.asarray(drawn[k], dtype=np.float64)
        assert w.shape == tuple(s), f"{op}.{k}: initialised {w.shape}, declared {tuple(s)}"
        out[k] = w
    return out


def init_weights(graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Every weight of `graph`, float64, keyed exactly like ``graph.weight_shapes()``."""
    out = {}
    for node in graph.order():
        owned = node.weight_shapes()
        if owned:
            # the initialiser sees every weight of the layer, a tied one too (a tied linear's bias is
            # drawn from its weight's fan-in); only the layer's own weights are kept
            shapes = {k: tuple(int(d) for d in s) for k, s in node.spec.weights(node.input_shapes, node.attrs).items()}
            layer = init_layer(node.op, shapes, node.attrs, layer_rng(seed, node.name))
            out.update({join(node.name, k): w for k, w in layer.items() if k in owned})
    return out
