"""conv1d as a torch layer: causal depthwise convolution then the activation;
``step`` is a dot product with the taps.

The sequence form works time-major, (B, K-1+L, D) after the window of the last K-1
inputs, as K shifted multiply-adds (``addcmul``), one per tap: for the few taps of
these convolutions that is faster on CPU, forward and backward, than ``F.conv1d``
with ``groups = D``, which needs channel-major copies on the way in and out."""
from __future__ import annotations

import torch

from ..base import Recurrent, check_lengths
from .elementwise import activation


class Conv1d(Recurrent):
    """Causal depthwise convolution over time (torch Conv1d groups=D layout), then `activation`."""

    op = "conv1d"

    def forward(self, x, state=None, return_state=False, lengths=None):
        lengths = check_lengths(lengths, x)
        batch, length, d = x.shape
        taps = self.weight.shape[-1]
        window = (x.new_zeros(batch, taps - 1, d) if state is None else state["window"].to(x.dtype).transpose(1, 2))
        padded = torch.cat([window, x], 1)                                  # (B, K-1+L, D)
        w = self.weight[:, 0, :].t()                                        # (K, D)
        bias = getattr(self, "bias", None)
        newest = padded[:, taps - 1:]
        y = newest * w[taps - 1] if bias is None else torch.addcmul(bias, newest, w[taps - 1])
        for k in range(taps - 1):
            y = torch.addcmul(y, padded[:, k:k + length], w[k])
        y = activation(self.attrs["activation"])(y)
        if not return_state:
            return y
        return y, {"window": self._last_inputs(padded.transpose(1, 2), lengths, taps - 1)}

    def step(self, x_t, state=None):
        """One token: a dot product of the window with the taps (no convolution call)."""
        if state is None:
            state = self.init_state(x_t.shape[0], x_t.dtype, x_t.device)
        full = torch.cat([state["window"].to(x_t.dtype), x_t.unsqueeze(-1)], -1)      # (B, D, K)
        y = (full * self.weight[:, 0, :]).sum(-1)
        bias = getattr(self, "bias", None)
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
