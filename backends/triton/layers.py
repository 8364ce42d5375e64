"""Triton runtime layers: the torch layers with their hot paths routed to the generated kernels.

Each class subclasses the torch backend's layer of the same op and adds no
state, so parameters, attribute handling, ``init_state`` and state layouts
are the torch layer's; ``swap(module)`` turns a built torch layer into the
Triton one in place (``module.__class__``), keeping its ``state_dict``.

* ``SelectiveSSM``: ``forward`` is one fused kernel (prologue: delta bias,
  softplus, ``lengths`` mask, discretization; recurrence; epilogue: C
  contraction, D skip, silu gate) with a fused backward; ``step`` is the
  single-token kernel, updating the given state tensor in place (``Conv1d.step``
  likewise shifts its window in place).
* ``SSM`` (kind ``diag``, plans scan / recurrent): the complex diagonal
  recurrence kernel and its backward (the discretization of the parameters
  stays in torch: O(H N) work, differentiated by autograd); the FFT ``conv``
  plan and the other kinds run the torch path.
* ``Conv1d``: causal depthwise convolution with the activation fused, forward
  and backward kernels (activations without a kernel run in torch).
* ``RMSNorm``: the RMSNorm kernel, forward and backward.

Each layer takes its specialisation from the compiler: ``configure(call)``
keeps the fusion region's flags and the call's discretization program
(``takes`` decides from them whether the kernels run).  Where a kernel
cannot take a call (no region, a discretization whose ``Bbar`` is not
``gain(A, dt) * B``, an activation without a kernel, gradients through
``step``) the torch implementation runs instead.
"""
from __future__ import annotations

import torch

from seqc import discretization
from seqc.backends.torch import layers as torch_layers
from seqc.backends.torch.base import check_lengths, no_autocast

from . import codegen, kernels

def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def takes(op: str, flags: dict | None, disc) -> bool:
    """Whether a layer of ``op`` with these region flags and discretization program runs kernels
    (the one rule the layers and ``emit``'s kernel plan share).  No region (no fusion pass):
    the torch path; RMSNorm is elementwise and needs none."""
    if op == "rmsnorm":
        return True
    if flags is None:
        return False
    if op == "selective_ssm":
        return kernels.has_kernel(disc)
    if op == "ssm":
        return flags.get("kind") == "diag" and kernels.has_kernel(disc)
    if op == "conv1d":
        return flags.get("activation") in codegen.ACTIVATION_CODES
    return False


class KernelLayer:
    """Mixin: the compiler's decisions for the kernels, taken from the lowered call.

    ``configure(call)`` (the torch layer's, plus) keeps the call's fusion region flags
    (``self.flags``: the kernel's constexpr specialisation, None without a region: the torch
    path runs) and its DiscProgram (``self.disc_program``: the scan kernels' ``_disc`` is
    printed from it; a call without one gets the program of the method its region names)."""

    flags = None
    disc_program = None

    def configure(self, call) -> None:
        super().configure(call)
        region = getattr(call, "region", None)
        self.flags = dict(region.flags) if region is not None else None
        disc = getattr(call, "disc", None)
        if disc is None and self.flags is not None and "disc" in self.flags:
            # no program stored on the call (pipeline without the discretize pass): the program of
            # the method the region names, from the same derivation
            disc = discretization.program("diag", self.flags["disc"])
        self.disc_program = disc

    def kernel(self) -> bool:
        """Whether this layer runs its kernels (``takes``)."""
        return takes(self.op, self.flags, self.disc_program)


class SelectiveSSM(KernelLayer, torch_layers.SelectiveSSM):
    """Mamba's selective scan through the generated fused kernels."""

    assoc = None      # within a chunk: tl.associative_scan / sequential loop / None = kernels.default_assoc()

    def _kernel_args(self):
        A = -torch.exp(self.A_log)
        bias = self.delta_bias if self.attrs["delta_bias"] else None
        return A, bias

    def forward(self, u, delta, B, C, z=None, state=None, return_state=False, lengths=None):
        flags = self.flags
        if not self.kernel():
            return super().forward(u, delta, B, C, z, state=state, return_state=return_state, lengths=lengths)
        lengths = check_lengths(lengths, u)
        with no_autocast(u):
            A, bias = self._kernel_args()
            x0 = None if state is None else state["x"]
            y, x = kernels.selective_scan(u, delta, A, B, C, self.D if flags["d_skip"] else None,
                                          z if flags["gate"] else None, bias, x0, lengths,
                                          delta_softplus=flags["delta_softplus"], disc=self.disc_program,
                                          assoc=self.assoc)
        return (y, {"x": x}) if return_state else y

    def step(self, u_t, delta_t, B_t, C_t, z_t=None, state=None):
        A, bias = self._kernel_args()
        flags = self.flags
        if not self.kernel() or _needs_grad(u_t, delta_t, B_t, C_t, z_t, A, self.D, bias):
            return super().step(u_t, delta_t, B_t, C_t, z_t, state=state)
        acc = kernels.work_dtype(u_t, A)
        x = None if state is None else state["x"]
        if x is not None and (x.dtype != acc or not x.is_contiguous()):
            x = x.to(acc).contiguous()
        with no_autocast(u_t):
            y, x = kernels.selective_step(u_t, delta_t, A, B_t, C_t, self.D if flags["d_skip"] else None,
                                          z_t if flags["gate"] else None, bias, x,
                                          delta_softplus=flags["delta_softplus"], disc=self.disc_program)
        return y, {"x": x}


class SSM(KernelLayer, torch_layers.SSM):
    """The LTI SSM; kind diag with a scan / recurrent plan runs the complex recurrence kernel."""

    def _kernel_plan(self, u):
        if not self.kernel():
            return False
        plan = self.plan
        if plan == "auto" and self.plan_for is not None:
            plan = self.plan_for(u.shape[0], u.shape[1], _needs_grad(u, *self.parameters()))
        return plan in ("scan", "recurrent")

    def step(self, u_t, state=None):
        """One token through the LTI kernel (a sequence of length 1 from the given state)."""
        if not self.kernel():
            return super().step(u_t, state=state)
        y, new_state = self.forward(u_t.unsqueeze(1), state=state, return_state=True, plan="scan")
        return y[:, 0], new_state

    def forward(self, u, state=None, return_state=False, lengths=None, plan=None):
        if plan is None and not self._kernel_plan(u):
            return super().forward(u, state=state, return_state=return_state, lengths=lengths)
        lengths = check_lengths(lengths, u)
        work = kernels.work_dtype(u, self.D)
        with no_autocast(u):
            system = self.system(work)                 # discretized parameters (torch, O(H N))
            self.last_plan = "scan"
            y, x = kernels.lti_scan(u, system.a, system.Bbar, system.C, self.D, None if state is None else state["x"],
                                    lengths, disc=self.disc_program)
        return (y, {"x": x}) if return_state else y


class Conv1d(KernelLayer, torch_layers.Conv1d):
    """Causal depthwise conv1d + activation through the generated kernels."""

    def forward(self, x, state=None, return_state=False, lengths=None):
        if not self.kernel():
            return super().forward(x, state=state, return_state=return_state, lengths=lengths)
        lengths = check_lengths(lengths, x)
        window = None if state is None else state["window"]
        y, xp = kernels.conv1d(x, self.weight, getattr(self, "bias", None), window, self.flags["activation"])
        if not return_state:
            return y
        taps = self.weight.shape[-1]
        return y, {"window": self._last_inputs(xp.transpose(1, 2), lengths, taps - 1)}


    def step(self, x_t, state=None):
        bias = getattr(self, "bias", None)
        taps = self.weight.shape[-1]
        if (not self.kernel() or taps < 2
                or _needs_grad(x_t, self.weight, bias)):
            return super().step(x_t, state=state)
        window = None if state is None else state["window"]
        if window is None:
            window = x_t.new_zeros(x_t.shape[0], x_t.shape[1], taps - 1)
        elif window.dtype != x_t.dtype or not window.is_contiguous():
            window = window.to(x_t.dtype).contiguous()
        y, window = kernels.conv1d_step(x_t, self.weight, bias, window, self.flags["activation"])
        return y, {"window": window}


class RMSNorm(torch_layers.RMSNorm):
    """RMSNorm (elementwise, no region of its own) through its forward / backward kernels."""

    def map(self, x):
        return kernels.rmsnorm(x, self.weight, self.attrs["eps"])


SWAPS = {torch_layers.SelectiveSSM: SelectiveSSM, torch_layers.SSM: SSM,
         torch_layers.Conv1d: Conv1d, torch_layers.RMSNorm: RMSNorm}


def swap(module) -> bool:
    """Turn a torch layer into its Triton subclass in place; False when there is none."""
    cls = SWAPS.get(type(module))
    if cls is None:
        return False
    module.__class__ = cls
    return True
