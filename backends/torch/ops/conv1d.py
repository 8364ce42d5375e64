"""conv1d as a torch layer: causal depthwise convolution then the activation;
``step`` is a dot product with the taps.

The sequence form works time-major, (B, K-1+L, D) after the window of the last K-1
inputs, as K shifted multiply-adds, one per tap (an autograd Function, in place
both ways): for the few taps of these convolutions that is faster on CPU, forward
and backward, than ``F.conv1d`` with ``groups = D``, which needs channel-major
copies on the way in and out."""
from __future__ import annotations

import torch

from ..base import Recurrent, check_lengths
from .elementwise import activation


class _CausalDepthwise(torch.autograd.Function):
    """y_t = bias + sum_k w_k * padded_{t+k} over (B, K-1+L, D) -> (B, L, D), one in-place
    multiply-add per tap both ways (autograd through slices would zero-fill and add a full-size
    gradient per tap)."""

    @staticmethod
    def forward(ctx, padded, w, bias):
        taps = w.shape[0]
        length = padded.shape[1] - taps + 1
        y = padded[:, taps - 1:] * w[taps - 1]
        if bias is not None:
            y += bias
        for k in range(taps - 1):
            y.addcmul_(padded[:, k:k + length], w[k])
        ctx.save_for_backward(padded, w)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        padded, w = ctx.saved_tensors
        taps = w.shape[0]
        length = dy.shape[1]
        dpad = torch.empty_like(padded)
        if torch.compiler.is_compiling():           # dynamo refuses a non-contiguous out=
            dpad[:, taps - 1:].copy_(dy * w[taps - 1])
        else:
            torch.mul(dy, w[taps - 1], out=dpad[:, taps - 1:])
        dpad[:, :taps - 1].zero_()
        for k in range(taps - 1):
            dpad[:, k:k + length].addcmul_(dy, w[k])
        dw = torch.stack([(dy * padded[:, k:k + length]).sum((0, 1)) for k in range(taps)])
        return dpad, dw, dy.sum((0, 1)) if ctx.has_bias else None


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
        y = _CausalDepthwise.apply(padded, w, self.optional("bias"))
        y = activation(self.attrs["activation"])(y)
        if not return_state:
            return y
        return y, {"window": self._last_inputs(padded.transpose(1, 2), lengths, taps - 1)}

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
