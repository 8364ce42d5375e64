"""The user's cache directory, shared by everything seqc caches on disk.

``$SEQC_CACHE_DIR``, else ``$XDG_CACHE_HOME/seqc``, else ``~/.cache/seqc``: never the
installed package (read-only in many installs).  What lives there: the generated
numba kernels and numba's machine code beside them (``backends/torch/cpu_kernels``),
the generated Triton kernels and tuning table (``triton/``), and lark's analysis of
the grammar (``parser/``).  Every user of it falls back to working without a cache
when the directory cannot be written.
"""
from __future__ import annotations

import os


def cache_root() -> str:
    """$SEQC_CACHE_DIR, else $XDG_CACHE_HOME/seqc, else ~/.cache/seqc (read at each call)."""
    if os.environ.get("SEQC_CACHE_DIR"):
        return os.environ["SEQC_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "seqc")
