"""The Triton backend: fused GPU kernels generated from the planned IR, runnable on the CPU interpreter.

* ``printer``: sympy derivation -> scalar program -> Triton source (table of ops);
* ``codegen``: the kernel templates, specialised by constexpr region flags;
* ``cache``: generated modules on disk (hash-named, atomic writes) and tuned block sizes;
* ``kernels``: launchers and autograd Functions;
* ``layers``: the torch layers with their hot paths on the kernels;
* ``module``: ``build_module``, ``emit`` and ``TritonBackend``.

With ``TRITON_INTERPRET=1`` every kernel runs on the CPU through Triton's interpreter.
"""
from .module import TritonBackend, build_module, emit

__all__ = ["TritonBackend", "build_module", "emit"]
