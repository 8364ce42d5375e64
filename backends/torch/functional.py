"""Stateless ops as torch functions (what generated torch code calls as ``fn.<op>``).

Each function lives with its family in ``backends/torch/ops/`` and registers
itself with ``@torch_function``; ``FUNCTIONS`` is that registry (op name ->
function taking the op's tensor inputs positionally and the node's attributes
as keywords) and ``ACTIVATIONS`` / ``activation`` the one table of activation
functions the layers share.
"""
from __future__ import annotations

from . import ops  # noqa: F401  (imports every op module, filling FUNCTIONS)
from .base import FUNCTIONS, torch_function
from .ops.elementwise import (ACTIVATIONS, activation, add, dropout, gate, gelu, glu, mul, relu, sigmoid, silu,
                              softplus, sub, tanh)
from .ops.structural import concat, split

__all__ = ["FUNCTIONS", "ACTIVATIONS", "activation", "torch_function", "add", "sub", "mul", "dropout", "gate", "glu",
           "silu", "gelu", "relu", "softplus", "sigmoid", "tanh", "split", "concat"]
