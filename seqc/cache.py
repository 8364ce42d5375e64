"""The user's cache directory, shared by everything seqc caches on disk.

``$SEQC_CACHE_DIR``, else ``$XDG_CACHE_HOME/seqc``, else ``~/.cache/seqc``: never the
installed package (read-only in many installs).  What lives there: the generated
numba kernels and numba's machine code beside them (``backends/torch/cpu_kernels``),
the generated Triton kernels and tuning table (``triton/``), and lark's analysis of
the grammar (``parser/``).  Every user of it falls back to working without a cache
when the directory cannot be written.

``Recent`` is the in-process side: the last few results of a pure function of some
text (parsed ASTs, code objects of generated source), keyed by a hash of the text so
the text itself is not kept.
"""
from __future__ import annotations

import collections
import hashlib
import os
import threading


def cache_root() -> str:
    """$SEQC_CACHE_DIR, else $XDG_CACHE_HOME/seqc, else ~/.cache/seqc (read at each call)."""
    if os.environ.get("SEQC_CACHE_DIR"):
        return os.environ["SEQC_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "seqc")


def text_digest(text: str) -> bytes:
    """The key of a text in a ``Recent`` (sha256; lone surrogates allowed)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class Recent:
    """The values of the last ``keep`` distinct keys, thread-safe; the least recently used
    is dropped first."""

    def __init__(self, keep: int):
        self.keep = keep
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key):
        """The value stored under ``key`` (now the most recent), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.keep:
                self._items.popitem(last=False)
