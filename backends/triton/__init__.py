"""The Triton backend: fused GPU kernels generated from the planned IR, runnable on the CPU interpreter.

* ``printer``: the Triton table of ``seqc.scalar`` and the ``_disc`` /
  ``_disc_grad`` jit functions printed from a call's discretization program;
* ``codegen``: the kernel templates, specialised by constexpr region flags;
* ``cache``: generated modules on disk (hash-named, atomic writes) and tuned block sizes;
* ``kernels``: launchers and autograd Functions;
* ``layers``: the torch layers with their hot paths on the kernels, configured from their calls;
* ``module``: ``build_module`` and ``emit`` from one lowered program;
* ``backend``: ``TritonBackend``, registered as ``"triton"``.

With ``TRITON_INTERPRET=1`` every kernel runs on the CPU through Triton's
interpreter.  Importing this package does not import triton (so the backend
can say why it is unavailable); the names below load on first use.
"""
from __future__ import annotations

import importlib

_LAZY = {"TritonBackend": "backend", "build_module": "module", "emit": "module"}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
