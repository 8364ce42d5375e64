"""conv1d as a torch layer: causal depthwise convolution (F.conv1d on a window
of the last K-1 inputs) then the activation; ``step`` is a dot product with the taps."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import Recurrent, check_lengths
from .elementwise import activation


class Conv1d(Recurrent):
    """Causal depthwise convolution over time (torch Conv1d groups=D layout), then `activation`."""

    op = "conv1d"

    def forward(self, x, state=None, return_state=False, lengths=None):
        lengths = check_lengths(lengths, x)
        batch, length, d = x.shape
        taps = self.weight.shape[-1]
        window = (x.new_zeros(batch, d, taps - 1) if state is None else state["window"].to(x.dtype))
        padded = torch.cat([window, x.transpose(1, 2)], -1)                # (B, D, K-1+L)
        y = F.conv1d(padded, self.weight, self.optional("bias"), groups=d)
        y = activation(self.attrs["activation"])(y).transpose(1, 2)
        if not return_state:
            return y
        return y, {"window": self._last_inputs(padded, lengths, taps - 1)}

    def step(self, x_t, state=None):
        """One token: a dot product of the window with the taps (no convolution call)."""
        if state is None:
            state = self.init_state(x_t.shape[0], x_t.dtype, x_t.device)
        window = state["window"]
        window = window if window.dtype == x_t.dtype else window.to(x_t.dtype)
        full = torch.cat([window, x_t.unsqueeze(-1)], -1)                                  # (B, D, K)
        y = (full * self.weight[:, 0, :]).sum(-1)
        bias = self.optional("bias")
        if bias is not None:
            y = y + bias
        return activation(self.attrs["activation"])(y), {"window": full[..., 1:]}

    @staticmethod
    def _last_inputs(padded, lengths, count):
        """The `count` inputs before each sequence's end: padded positions [length, length + count)."""
        if lengths is None:
            return padded[..., padded.shape[-1] - count:]
        index = lengths[:, None] + torch.arange(count, device=padded.device)[None, :]
        return padded.gather(-1, index[:, None, :].expand(-1, padded.shape[1], -1))
