"""Torch implementations of the ops, one module per op family.  Every module
here is imported when ``seqc.backends.torch`` is, so a new op needs only a new
file: its ``Layer`` subclass (``op = "name"``) and ``@torch_function`` functions
register themselves in ``backends.torch.base.LAYERS`` / ``FUNCTIONS``."""
from __future__ import annotations

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
