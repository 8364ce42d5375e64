"""seqc: a compiler for sequence models (SSMs, selective SSMs, LSTMs, attention).

Public API: ``parse``, ``build_graph``, ``compile``, ``discretize``,
``difftest``, ``interop``, ``register_op`` (add an op of your own; see
``seqc.ops``), ``generate`` (decoding with a compiled language model),
``Spec`` (a spec named explicitly as a file or as source text, with include
search paths), the one error type ``SeqcError`` and ``SeqcWarning``.
"""
from __future__ import annotations

import os as _os

# Running from a source checkout: `seqc.backends` and `seqc.grammar` live beside
# the package (installed distributions map them inside it via pyproject).
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isdir(_os.path.join(_root, "backends")) and _os.path.isdir(_os.path.join(_root, "grammar")) \
        and not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "backends")):
    __path__.append(_root)  # type: ignore[name-defined]

from .errors import SeqcError, SeqcWarning  # noqa: E402
from .parser import parse  # noqa: E402
from .loader import Spec  # noqa: E402

__all__ = ["SeqcError", "SeqcWarning", "Spec", "parse"]
__version__ = "0.1.0"

from .analysis import build_graph  # noqa: E402
from .api import compile, difftest  # noqa: E402,A001
from . import interop  # noqa: E402
from .discretization import discretize  # noqa: E402
from .ops import register_op  # noqa: E402
from .generate import generate  # noqa: E402

__all__ += ["build_graph", "compile", "discretize", "difftest", "generate", "interop", "register_op"]

