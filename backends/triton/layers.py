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

Where a kernel cannot take a call (gradients through ``step``, an op or
attribute without a kernel) the torch implementation runs instead.
"""
from __future__ import annotations

import torch

from seqc.backends.torch import layers as torch_layers
from seqc.backends.torch.base import check_lengths, no_autocast

from . import codegen, kernels

SCAN_DISCS = ("mamba", "zoh", "bilinear", "euler", "backward_euler")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class SelectiveSSM(torch_layers.SelectiveSSM):
    """Mamba's selective scan through the generated fused kernels."""

    assoc = None      # within a chunk: tl.associative_scan / sequential loop / None = kernels.default_assoc()

    def flags(self) -> dict:
        """The kernel specialisation: the fusion region's flags when the compiler attached a region
        (``configure``), else the same dict built from the layer's attributes."""
        region = getattr(self, "region", None)
        flags = getattr(region, "flags", None)
        if isinstance(flags, dict) and "disc" in flags:
            return flags
        return {"delta_bias": bool(self.attrs["delta_bias"]), "delta_softplus": bool(self.attrs["delta_softplus"]),
                "disc": self.attrs["disc"], "d_skip": True, "gate": "silu"}

    def _kernel_args(self):
        A = -torch.exp(self.A_log)
        bias = self.delta_bias if self.attrs["delta_bias"] else None
        return A, bias

    def forward(self, u, delta, B, C, z=None, state=None, return_state=False, lengths=None):
        flags = self.flags()
        if flags["disc"] not in SCAN_DISCS:
            return super().forward(u, delta, B, C, z, state=state, return_state=return_state, lengths=lengths)
        lengths = check_lengths(lengths, u)
        with no_autocast(u):
            A, bias = self._kernel_args()
            x0 = None if state is None else state["x"]
            y, x = kernels.selective_scan(u, delta, A, B, C, self.D if flags["d_skip"] else None,
                                          z if flags["gate"] else None, bias, x0, lengths,
                                          delta_softplus=flags["delta_softplus"], disc=flags["disc"],
                                          assoc=self.assoc)
        return (y, {"x": x}) if return_state else y

    def step(self, u_t, delta_t, B_t, C_t, z_t=None, state=None):
        A, bias = self._kernel_args()
        flags = self.flags()
        if flags["disc"] not in SCAN_DISCS or _needs_grad(u_t, delta_t, B_t, C_t, z_t, A, self.D, bias):
            return super().step(u_t, delta_t, B_t, C_t, z_t, state=state)
        acc = kernels.work_dtype(u_t, A)
        x = None if state is None else state["x"]
        if x is not None and (x.dtype != acc or not x.is_contiguous()):
            x = x.to(acc).contiguous()
        with no_autocast(u_t):
            y, x = kernels.selective_step(u_t, delta_t, A, B_t, C_t, self.D if flags["d_skip"] else None,
                                          z_t if flags["gate"] else None, bias, x,
                                          delta_softplus=flags["delta_softplus"], disc=flags["disc"])
        return y, {"x": x}


class SSM(torch_layers.SSM):
    """The LTI SSM; kind diag with a scan / recurrent plan runs the complex recurrence kernel."""

    def _kernel_plan(self, u):
        if self.attrs["kind"] != "diag":
            return False
        plan = self.plan
        if plan == "auto" and self.plan_for is not None:
            plan = self.plan_for(u.shape[0], u.shape[1], _needs_grad(u, *self.parameters()))
        return plan in ("scan", "recurrent")

    def step(self, u_t, state=None):
        """One token through the LTI kernel (a sequence of length 1 from the given state)."""
        if self.attrs["kind"] != "diag":
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
                                    lengths, disc=self.attrs["disc"])
        return (y, {"x": x}) if return_state else y


class Conv1d(torch_layers.Conv1d):
    """Causal depthwise conv1d + activation through the generated kernels."""

    def forward(self, x, state=None, return_state=False, lengths=None):
        if self.attrs["activation"] not in codegen.ACTIVATION_CODES:
            return super().forward(x, state=state, return_state=return_state, lengths=lengths)
        lengths = check_lengths(lengths, x)
        window = None if state is None else state["window"]
        y, xp = kernels.conv1d(x, self.weight, getattr(self, "bias", None), window, self.attrs["activation"])
        if not return_state:
            return y
        taps = self.weight.shape[-1]
        return y, {"window": self._last_inputs(xp.transpose(1, 2), lengths, taps - 1)}


    def step(self, x_t, state=None):
        bias = getattr(self, "bias", None)
        taps = self.weight.shape[-1]
        if (self.attrs["activation"] not in codegen.ACTIVATION_CODES or taps < 2
                or _needs_grad(x_t, self.weight, bias)):
            return super().step(x_t, state=state)
        window = None if state is None else state["window"]
        if window is None:
            window = x_t.new_zeros(x_t.shape[0], x_t.shape[1], taps - 1)
        elif window.dtype != x_t.dtype or not window.is_contiguous():
            window = window.to(x_t.dtype).contiguous()
        y, window = kernels.conv1d_step(x_t, self.weight, bias, window, self.attrs["activation"])
        return y, {"window": window}


class RMSNorm(torch_layers.RMSNorm):
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
