"""The compiled Triton model and its emitted source, both from one lowered program.

``build_module(program, weights)`` (or ``swap_layers`` on a built model) builds the torch backend's module (same
module tree, generated forward, ``state_dict`` keys, ``forward`` / ``step`` /
``init_state`` / ``lengths`` API), turns every layer that has a Triton
kernel into its ``backends.triton.layers`` subclass and configures it from
its call (``layer.configure(call)``: the fusion region's flags, the
discretization program); the rest stay torch.

``emit(program)`` is what ``seqc emit FILE --backend triton`` prints: the
kernel plan (which layer runs which kernels with which region flags), the
generated Triton module of every discretization program in use (its
``_disc`` / ``_disc_grad`` printed from the program the ``discretize`` pass
stored on the call), the conv1d / RMSNorm kernels, and the launching PyTorch
module.
"""
from __future__ import annotations

from seqc.backends.torch import codegen as torch_codegen
from seqc.backends.torch.codegen import as_program
from seqc.backends.torch.module import build_module as torch_build_module

from . import codegen, layers

KERNELS = {"selective_ssm": "scan_fwd, scan_bwd, scan_step", "ssm": "scan_fwd[LTI], lti_bwd",
           "conv1d": "conv_fwd, conv_bwd_pre, conv_bwd_input, conv_step", "rmsnorm": "rmsnorm_fwd, rmsnorm_bwd"}


def kernel_plan(program) -> list[tuple]:
    """``(call, kernels or None)`` per layer, in program order."""
    return [(c, KERNELS[c.op] if layers.takes(c.op, _flags(c), c.disc) else None) for c in program.layers()]


def _flags(call):
    return None if call.region is None else dict(call.region.flags)


def emit(program) -> str:
    program = as_program(program)
    plan = kernel_plan(program)
    parts = ["# seqc Triton backend: generated kernels and their launcher", "#", "# kernel plan:"]
    for c, names in plan:
        where = f"{names} {_flags(c) if c.region is not None else ''}".rstrip() if names else "torch"
        parts.append(f"#   {c.name} ({c.op}): {where}")
    discs = {}
    for c, names in plan:
        if names and c.op in ("selective_ssm", "ssm"):
            discs.setdefault(c.disc.digest, c.disc)
    for disc in discs.values():
        parts += ["", f"# ---- generated Triton module: scan kernels, discretization {disc.method} ----",
                  codegen.module_source(disc)]
    if any(names and c.op in ("conv1d", "rmsnorm") for c, names in plan):
        parts += ["", "# ---- generated Triton module: conv1d and RMSNorm kernels ----", codegen.module_source(None)]
    parts += ["", "# ---- launcher: the PyTorch module; layers with kernels call backends.triton.kernels ----",
              torch_codegen.emit(program)]
    return "\n".join(parts)


def swap_layers(model, program):
    """Turn the layers of a built torch model that have kernels into Triton ones, in place, each
    configured from its call (parameters, dtype and device are kept)."""
    for call in as_program(program).layers():
        module = model.get_submodule(call.name)
        if layers.swap(module):
            module.configure(call)
    return model


def build_module(program, weights: dict | None = None):
    """The torch backend's module (float32, CPU) with the layers that have kernels swapped for
    Triton ones."""
    program = as_program(program)
    return swap_layers(torch_build_module(program, weights), program)
