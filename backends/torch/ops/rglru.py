"""rglru as a torch layer (Griffin's RG-LRU, transformers' RecurrentGemmaRglru):
the gates as one batched matmul per head, then the diagonal recurrence
``h_t = a_t h_{t-1} + u_t`` by one of two plans - ``scan`` (recursive doubling:
ceil(log2 L) elementwise steps, stable since it only multiplies decays <= 1)
or ``recurrent`` (a loop over time); under torch.compile either runs eagerly in an
intended graph break (``eager_when_compiled``), one graph for every length.  The
normaliser sqrt(1 - a^2) has RecurrentGemma's clipped gradient (at most
``MAX_SQRT_GRADIENT``).  ``lengths=``: past a sequence's end a = 1 and u = 0, so the final
state is the state after exactly that many steps.  The state accumulates in float32
(float64 for float64 inputs)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import (Recurrent, accumulator_dtype, check_lengths, eager_when_compiled, no_autocast, output_dtype,
                    work_dtype)

MAX_SQRT_GRADIENT = 1000.0      # RecurrentGemma clips d sqrt(v)/dv at this value (bfloat16 training)


def bounded_sqrt(v):
    """sqrt(v) whose gradient is 1 / sqrt(max(4 v, 1 / MAX_SQRT_GRADIENT^2)), as transformers'
    SqrtBoundDerivative (the normaliser sqrt(1 - a^2) has an unbounded derivative as a -> 1).
    The value is sqrt(v) exactly (plus (v - v) = 0); the gradient flows through the linear term
    only.  Plain tensor ops (no autograd.Function), so torch.compile traces it whole."""
    slope = torch.rsqrt(torch.clamp(4.0 * v, min=1.0 / MAX_SQRT_GRADIENT ** 2)).detach()
    return torch.sqrt(v).detach() + (v - v.detach()) * slope


def doubling_diag_scan(log_a, u, h):
    """h_t = exp(log_a_t) h_{t-1} + u_t over dim 1 of (B, L, ...) tensors by recursive doubling
    (Hillis-Steele): after the step with offset k every position holds the composition of the
    affine maps of its last 2k steps; ceil(log2 L) steps of elementwise work, products of
    decays <= 1 only (no division, stable).  Returns (all states, last state)."""
    a = torch.exp(log_a)
    u = torch.cat([u[:, :1] + a[:, :1] * h.unsqueeze(1), u[:, 1:]], 1)       # the initial state
    k = 1
    while k < u.shape[1]:
        u = torch.cat([u[:, :k], u[:, k:] + a[:, k:] * u[:, :-k]], 1)
        a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], 1)
        k *= 2
    return u, u[:, -1]


def loop_diag_scan(log_a, u, h):
    ys = []
    for la, ut in zip(log_a.unbind(1), u.unbind(1)):
        h = torch.exp(la) * h + ut
        ys.append(h)
    return torch.stack(ys, 1), h


class RGLRU(Recurrent):
    """State ``h (B, D)`` (+ ``started (B, 1)`` with ``reset``); ``step`` is one recurrence step."""

    op = "rglru"

    def __init__(self, in_features, attrs):
        super().__init__(in_features, attrs)
        self.plan = self.attrs["plan"]

    def state_dtype(self, dtype):
        return accumulator_dtype(dtype)

    def _gates(self, x):
        """(log a, gated input, sqrt(1 - a^2)) for x (B, L, D)."""
        heads, c = self.attrs["heads"], self.attrs["c"]
        xh = x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)
        gate_x = torch.sigmoid(torch.einsum("blhi,hij->blhj", xh, self.input_gate_weight.to(x.dtype))
                               + self.input_gate_bias.to(x.dtype)).reshape(x.shape)
        gate_a = torch.sigmoid(torch.einsum("blhi,hij->blhj", xh, self.recurrent_gate_weight.to(x.dtype))
                               + self.recurrent_gate_bias.to(x.dtype)).reshape(x.shape)
        log_a = -c * gate_a * F.softplus(self.recurrent_param.to(x.dtype))
        return log_a, x * gate_x, bounded_sqrt(-torch.expm1(2.0 * log_a))

    def forward(self, x, state=None, return_state=False, lengths=None):
        lengths = check_lengths(lengths, x)
        batch, length, d = x.shape
        work, out_dtype = work_dtype(x, self.recurrent_param), x.dtype
        acc = accumulator_dtype(work)
        reset = self.attrs["reset"]
        with no_autocast(x):
            x = x.to(work)
            if state is None:
                state = self.init_state(batch, work, x.device)
            h = state["h"].to(acc)
            log_a, u, norm = self._gates(x)
            if reset:
                first = state["started"][:, 0] == 0                         # rows at a document start
                at0 = torch.zeros(length, dtype=torch.bool, device=x.device)
                at0[0] = True
                norm = torch.where(first[:, None, None] & at0[None, :, None], torch.ones_like(norm), norm)
                h = torch.where(first[:, None], torch.zeros_like(h), h)
            u = u * norm
            log_a, u = log_a.to(acc), u.to(acc)
            if lengths is not None:
                keep = (torch.arange(length, device=x.device)[None, :] < lengths[:, None])[..., None]
                log_a, u = log_a * keep, u * keep
            scan = loop_diag_scan if self.plan == "recurrent" else doubling_diag_scan
            y, h = eager_when_compiled(scan, log_a, u, h)
        y = y.to(output_dtype(out_dtype, work))
        if not return_state:
            return y
        new = {"h": h}
        if reset:
            ran = torch.ones_like(state["started"]) if lengths is None else (lengths > 0)[:, None].to(
                state["started"].dtype)
            new["started"] = torch.maximum(state["started"], ran)
        return y, new
