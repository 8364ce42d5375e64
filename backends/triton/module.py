"""The compiled Triton model, its emitted source, and the backend object.

``build_module(graph, weights)`` builds the torch backend's module (same
module tree, generated forward, ``state_dict`` keys, ``forward`` / ``step`` /
``init_state`` / ``lengths`` API) and turns every layer that has a Triton
kernel into its ``backends.triton.layers`` subclass; the rest stay torch.

``emit(graph)`` is what ``seqc emit --backend triton`` prints: the kernel
plan (which layer runs which kernel with which constexpr flags), the
generated Triton module of every discretization in use, and the launching
PyTorch module.

``TritonBackend`` implements the backend interface (``available``,
``machine``, ``supports``, ``emit``, ``build``, ``trace``) with these.
"""
from __future__ import annotations

from seqc.backends.torch import codegen as torch_codegen
from seqc.backends.torch.module import build_module as torch_build_module

from . import codegen, kernels, layers


def _graph(program):
    """A lowered program carries its graph; a graph is its own."""
    return getattr(program, "graph", program)


def _inputs(node) -> list:
    """A node's inputs, or a lowered call's arguments (dropping absent optional ones)."""
    found = getattr(node, "inputs", None)
    if found is None:
        found = getattr(node, "args", ())
    return [x for x in found if x is not None]


def region_flags(node) -> dict | None:
    """The kernel specialisation of a layer node (the region flags), or None without a kernel."""
    a = node.attrs
    if node.op == "selective_ssm":
        if a.get("disc", "mamba") not in layers.SCAN_DISCS:
            return None
        return {"delta_bias": bool(a.get("delta_bias", False)), "delta_softplus": bool(a.get("delta_softplus", True)),
                "disc": a.get("disc", "mamba"), "d_skip": True,
                "gate": "silu" if len(_inputs(node)) > 4 else None}
    if node.op == "ssm":
        if a.get("kind", "diag") != "diag":
            return None
        return {"kind": "diag", "disc": a.get("disc", "zoh"), "d_skip": True}
    if node.op == "conv1d":
        act = a.get("activation", "identity")
        return None if act not in codegen.ACTIVATION_CODES else {"bias": bool(a.get("bias", True)), "activation": act}
    if node.op == "rmsnorm":
        return {"residual": False}
    return None


KERNELS = {"selective_ssm": "scan_fwd, scan_bwd, scan_step", "ssm": "scan_fwd[LTI], lti_bwd",
           "conv1d": "conv_fwd, conv_bwd_pre, conv_bwd_input", "rmsnorm": "rmsnorm_fwd, rmsnorm_bwd"}


def supports(node) -> bool:
    return region_flags(node) is not None


def kernel_plan(graph) -> list[str]:
    lines = []
    for n in graph.layers():
        flags = region_flags(n)
        where = f"{KERNELS[n.op]} {flags}" if flags is not None else "torch"
        lines.append(f"{n.name} ({n.op}): {where}")
    return lines


def methods(graph) -> list[str]:
    """The discretizations whose kernels the graph uses (the module of 'mamba' also holds conv/norm)."""
    used = {n.attrs.get("disc", "mamba") for n in graph.layers() if n.op == "selective_ssm" and supports(n)}
    return sorted(used) or ["mamba"]


def emit(program) -> str:
    graph = _graph(program)
    parts = ["# seqc Triton backend: generated kernels and their launcher", "#", "# kernel plan:"]
    parts += [f"#   {line}" for line in kernel_plan(graph)]
    for method in methods(graph):
        parts += ["", f"# ---- generated Triton module (discretization {method}) ----",
                  codegen.module_source(method)]
    parts += ["", "# ---- launcher: the PyTorch module; layers with kernels call backends.triton.kernels ----",
              torch_codegen.emit(graph)]
    return "\n".join(parts)


def build_module(program, weights: dict | None = None):
    """The torch backend's module with the layers that have kernels swapped for Triton ones."""
    graph = _graph(program)
    model = torch_build_module(graph, weights)
    for module in model.modules():
        layers.swap(module)
    object.__setattr__(model, "backend", "triton")
    return model


class TritonBackend:
    """The backend interface over this package."""

    name = "triton"
    autograd = True

    def available(self) -> str | None:
        return kernels.available()

    def machine(self, device: str, dtype: str) -> dict:
        """Planner machine model: the torch backend's for the same device and dtype (where the
        backend registry has one), marked as running the fused kernels of this package."""
        base = {"device": device, "dtype": dtype}
        try:
            from seqc.backend import get_backend
            base = dict(get_backend("torch").machine(device, dtype))
        except Exception:     # no backend registry (yet), or no torch machine model
            pass
        return {**base, "fused_scan": True, "kernels": sorted(KERNELS)}

    def supports(self, call) -> bool:
        """A graph node or lowered call (op, attrs, inputs/args) with a kernel."""
        return supports(call)

    def emit(self, program) -> str:
        return emit(program)

    def build(self, program, weights: dict | None = None):
        return build_module(program, weights)

    def trace(self, model, inputs):
        return model.trace(*inputs)
