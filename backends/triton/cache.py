"""On-disk cache of generated Triton modules and of chosen block sizes.

``triton.jit`` reads its function's source file, so generated kernels must
live in real files.  ``load(source, key)`` writes ``source`` to
``<cache dir>/triton/k_<sha256 of source and key>.py`` (written to a
temporary file in the same folder, then ``os.replace``-d: concurrent
processes either see no file or a complete one) and imports it once per
process.  The cache directory is ``$SEQC_CACHE_DIR``, else
``$XDG_CACHE_HOME/seqc``, else ``~/.cache/seqc``.

``block_sizes(name, key, candidates, bench)`` keeps the fastest of
``candidates`` per (kernel, shape key) in ``tuning.json`` beside the kernels;
on the interpreter (where timing says nothing about a GPU) it returns the
first candidate without measuring.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

_LOCK = threading.Lock()
_MODULES: dict[str, object] = {}


def cache_dir() -> Path:
    """``triton/`` in seqc's cache directory (``seqc.cache.cache_root``)."""
    from seqc.cache import cache_root
    return Path(cache_root()) / "triton"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def digest(source: str, key: str = "") -> str:
    return hashlib.sha256((key + "\0" + source).encode()).hexdigest()[:24]


def path_for(source: str, key: str = "") -> Path:
    return cache_dir() / f"k_{digest(source, key)}.py"


def load(source: str, key: str = ""):
    """The imported module of `source` (written to the cache first if absent or different)."""
    name = f"seqc_triton_k_{digest(source, key)}"
    with _LOCK:
        if name in _MODULES:
            return _MODULES[name]
        path = path_for(source, key)
        try:
            current = path.read_text(encoding="utf-8")
        except OSError:
            current = None
        if current != source:
            _atomic_write(path, source)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _MODULES[name] = module
        return module


def _tuning_path() -> Path:
    return cache_dir() / "tuning.json"


def block_sizes(name: str, key, candidates: list, bench=None, interpret: bool = False):
    """The best of `candidates` for kernel `name` at shape `key` (cached on disk)."""
    if interpret or bench is None or len(candidates) == 1:
        return candidates[0]
    entry = f"{name}:{key}"
    path = _tuning_path()
    with _LOCK:
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            table = {}
        if entry in table and table[entry] in candidates:
            return table[entry]
        timings = [(bench(c), i) for i, c in enumerate(candidates)]
        best = candidates[min(timings)[1]]
        table[entry] = best
        _atomic_write(path, json.dumps(table, indent=1, sort_keys=True))
        return best
