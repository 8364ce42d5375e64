"""Backends: the interface every code generator implements, and their registry.

A backend turns a lowered ``Program`` (``seqc.lower``) into source text
(``emit``) and a runnable model (``build``), runs a model keeping every node's
value (``trace``, for difftest), and gives the planner its machine model for a
device and element type (``machine``).  ``compile``, ``seqc emit``, ``seqc
run``, difftest, bench and explain all go through ``get_backend``; nothing
outside a backend's own modules asks which backend it is.

The built-in backends register themselves when their module is first imported
(``backends/<name>/backend.py``, imported lazily, so the NumPy path never
imports torch).  A backend that cannot run here stays registered and says why
(``available()``).
"""
from __future__ import annotations

import importlib

from .errors import SeqcError, did_you_mean


class Backend:
    """What a backend provides.  Subclasses set ``name`` and override the methods."""

    name: str = ""
    autograd: bool = False          # its models differentiate (gradients can be compared)
    default_dtype: str = "float32"
    devices: tuple[str, ...] = ("cpu",)
    dtypes: tuple[str, ...] = ("float64", "float32", "bfloat16", "float16")

    def available(self) -> str | None:
        """None when usable here, else the reason it is not."""
        return None

    def machine(self, device: str, dtype: str) -> dict:
        """The planner's machine model: ``step`` (seconds per sequential step),
        ``llc`` (bytes of last-level cache), ``ns`` (ns per element, per plan)."""
        raise NotImplementedError

    def supports(self, call) -> bool:
        """Whether this backend runs the call (or the region it anchors) natively."""
        return True

    def emit(self, program) -> str:
        """The generated source of the program."""
        raise NotImplementedError

    def build(self, program, weights: dict | None = None, *, seed: int = 0, device: str = "cpu",
              dtype: str | None = None):
        """A runnable model of the program; ``weights`` (NumPy arrays keyed like
        ``state_dict``) or the seeded default initialisation."""
        raise NotImplementedError

    def trace(self, model, inputs, hook=None) -> tuple:
        """``(outputs, {node_id: [values]})``: the outputs (a list) and every node's results;
        ``hook(node_id, value)`` may replace a node's result as it is computed."""
        raise NotImplementedError

    def inputs(self, model, arrays) -> list:
        """NumPy inputs in the model's own form (tensors on its device, floats in its dtype)."""
        return list(arrays)

    def inference(self):
        """A context in which calls record nothing for gradients."""
        import contextlib
        return contextlib.nullcontext()

    def backward(self, model, outputs) -> None:
        """Back-propagate the sum of ``outputs`` into the model's parameters (autograd backends)."""
        raise SeqcError(f"the {self.name} backend does not compute gradients")

    def forward(self, model, inputs) -> list:
        """The model's outputs on NumPy inputs, as a list of float64 NumPy arrays (no gradients)."""
        raise NotImplementedError

    def check_target(self, device: str, dtype: str) -> None:
        if device not in self.devices:
            raise SeqcError(f"the {self.name} backend runs on {', '.join(self.devices)}, not {device!r}")
        if dtype not in self.dtypes:
            raise SeqcError(f"unknown dtype {dtype!r} for the {self.name} backend{did_you_mean(dtype, self.dtypes)}; "
                            f"expected one of {', '.join(self.dtypes)}")


class Unavailable(Backend):
    """A registered backend that cannot run here; every use raises its reason."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def available(self) -> str | None:
        return self.reason

    def machine(self, device, dtype):
        raise SeqcError(self.reason)


_REGISTRY: dict[str, Backend] = {}
# built-in backends, imported on first use: name -> module that registers it
_BUILTIN = {"numpy": "seqc.backends.numpy.backend", "torch": "seqc.backends.torch.backend",
            "triton": "seqc.backends.triton.backend"}
_PENDING = {"triton": "the triton backend is not available yet (planned: fused kernels generated from the fusion "
                      "regions); use backend='torch' or 'numpy'"}


def register_backend(backend: Backend) -> Backend:
    """Register (or replace) a backend under ``backend.name``."""
    if not backend.name or not backend.name.isidentifier():
        raise SeqcError(f"a backend needs a name that is an identifier, got {backend.name!r}")
    _REGISTRY[backend.name] = backend
    return backend


def backend_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys(list(_BUILTIN) + list(_REGISTRY)))


def get_backend(name: str, *, check: bool = True) -> Backend:
    """The backend called ``name``; SeqcError if unknown or (with ``check``) unusable here."""
    if name not in _REGISTRY and name in _BUILTIN:
        try:
            importlib.import_module(_BUILTIN[name])
        except ModuleNotFoundError as e:
            missing = e.name or ""
            if name not in _PENDING or not (_BUILTIN[name] + ".").startswith(missing + "."):
                raise
            register_backend(Unavailable(name, _PENDING[name]))
    if name not in _REGISTRY:
        names = backend_names()
        raise SeqcError(f"unknown backend {name!r}{did_you_mean(str(name), names)}; expected one of {', '.join(names)}")
    backend = _REGISTRY[name]
    if check and (why := backend.available()) is not None:
        raise SeqcError(why)
    return backend
