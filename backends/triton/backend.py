"""The ``triton`` backend object: the torch backend's model with generated Triton kernels inside.

``TritonBackend`` subclasses ``TorchBackend``: the same module tree,
``state_dict`` names, ``forward`` / ``step`` / ``init_state`` API, tensors,
gradients and ``trace``; ``build`` swaps in the kernel layers (configured
from each call's fusion region and discretization program), ``emit`` prints
the generated kernels and their launcher, ``machine`` is the torch model of
the device marked as running fused kernels.  Every call the torch backend
runs is supported: kernels where a region has one, torch elsewhere.

Usable with a CUDA device, or anywhere with ``TRITON_INTERPRET=1`` (Triton's
CPU interpreter; tensors stay on the CPU).  Without the interpreter a model
asked for on ``"cpu"`` (the default of ``compile`` and difftest) is placed on
``"cuda"``: compiled Triton kernels run nowhere else.  Importing this module does not
import triton: without it, or without either of those, ``available()`` says
so and ``get_backend("triton")`` refuses with that reason.
"""
from __future__ import annotations

import importlib.util
import sys

from seqc.backend import register_backend
from seqc.backends.torch.backend import TorchBackend

from .codegen import interpreted


def _late_interpreter() -> str | None:
    """Triton decides at import whether its own library functions (tl.sum, ...) are interpreted:
    TRITON_INTERPRET=1 set after triton was imported cannot work."""
    if "triton" not in sys.modules:
        return None
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction
    if isinstance(standard.sum, InterpretedFunction):
        return None
    return ("TRITON_INTERPRET=1 was set after triton was imported; set it before Python starts "
            "(or before the first import of triton)")


class TritonBackend(TorchBackend):
    name = "triton"
    autograd = True
    default_dtype = "float32"

    def available(self) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "the triton backend needs the 'triton' package, which is not installed (pip install triton)"
        import torch
        if interpreted():
            return _late_interpreter()
        if torch.cuda.is_available():
            return None
        return ("the triton backend needs a CUDA device, or TRITON_INTERPRET=1 to run its kernels on the CPU "
                "interpreter; neither is present here")

    def machine(self, device: str, dtype: str) -> dict:
        from .module import KERNELS
        return {**super().machine(device, dtype), "fused": True, "kernels": sorted(KERNELS)}

    def emit(self, program) -> str:
        from .module import emit
        return emit(program)

    def build(self, program, weights=None, *, seed=0, device="cpu", dtype=None):
        from .module import swap_layers
        if device == "cpu" and not interpreted():
            device = "cuda"     # compiled kernels run on the GPU; only the interpreter runs them on the CPU
        return swap_layers(super().build(program, weights, seed=seed, device=device, dtype=dtype), program)


register_backend(TritonBackend())
