"""The torch runtime layers: one ``nn.Module`` per registry op with weights or state.

The selective scan layer is defined here and the LTI ``SSM`` in ``lti.py``; the
others live in ``backends/torch/ops/`` (one module per family) and are
re-exported here.  ``LAYERS`` is ``backends.torch.base.LAYERS``, which every
``Layer`` subclass with an ``op`` joins when it is defined.

``LAYERS[op](in_features, attrs)`` builds a layer; ``in_features[k]`` is the
last dimension of input k and ``attrs`` the node's attributes (registry
defaults fill the missing ones).  Parameters carry exactly the registry's
weight names and shapes, initialised to zeros (the compile step loads values).

Every layer has ``forward(*inputs, state=None, return_state=False, lengths=None)``
(returning ``y`` or ``(y, final_state)``), ``init_state(batch, dtype, device)``
and ``step(*inputs_t, state) -> (y_t, new_state)``.  States are dicts of
tensors, batch first, in the layouts of the NumPy references (``seqc/ops/<family>.py``):

* conv1d ``window (B, D, K-1)``; ssm ``x`` (diag ``(B, H, N/2, 2)`` and s5
  ``(B, N/2, 2)`` complex as (re, im), dense / shift ``(B, H, N)``);
  selective_ssm ``x (B, D, N)``; lstm ``h``, ``c`` ``(B, layers, hidden)``;
  attention ``k``, ``v`` ``(B, heads, T, head_dim)`` plus ``valid (B, T)``
  (bool) once a ``lengths=`` call has left padding in the cache.

``lengths`` (``(B,)`` integers): outputs before each sequence's length equal
running it alone and the final state is the state after exactly that many
steps.  SSM states accumulate in float32 (float64 for float64 inputs), with
autocast off, whatever the input precision.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import scan
from .base import (LAYERS, Layer, Pointwise, Recurrent, accumulator_dtype, check_lengths, no_autocast,
                   output_dtype, with_defaults, work_dtype)
from .lti import SYSTEMS, SSM, LinearSystem, causal_conv, free_response, linear_scan, powers
from .ops.attention import Attention
from .ops.conv1d import Conv1d
from .ops.embedding import Embedding
from .ops.linear import Linear
from .ops.lstm import LSTM
from .ops.norms import LayerNorm, RMSNorm

# -- selective ssm ------------------------------------------------------------------------------


def _as(t, dtype):
    """``t`` in ``dtype`` (None stays None); no ``.to`` call when it already is (decoding
    makes a dozen of these per layer and token)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


class SelectiveSSM(Recurrent):
    """Mamba's selective scan (``scan.selective_scan``); plan "recurrent" loops over `step`.

    The discretization is the compiled program of the ``discretize`` pass, handed
    over at build time by ``configure(call)``; a layer built by hand derives it
    from ``attrs["disc"]`` on first use."""

    op = "selective_ssm"

    def __init__(self, in_features, attrs):
        super().__init__(in_features, attrs)
        self.plan = self.attrs["plan"]
        self.region = None
        self.disc_program = None     # DiscProgram (configure); None: derived from attrs["disc"]
        self.discretize_fn = None

    def state_dtype(self, dtype):
        return accumulator_dtype(dtype)

    def set_discretization(self, program) -> None:
        super().set_discretization(program)
        if getattr(program, "structure", None) == "diag":  # a diag DiscProgram: registered for the fused
            scan.program_key(program)                       # custom op now, not under torch.compile

    def _scan_args(self, work, gate=False):
        flags = scan.kernel_flags(self.attrs, self.region, gate)
        return dict(A=-torch.exp(_as(self.A_log, work)), D=_as(self.D, work) if flags["d_skip"] else None,
                    delta_bias=_as(self.delta_bias, work) if flags["delta_bias"] else None,
                    delta_softplus=flags["delta_softplus"],
                    disc=self.disc_program if self.disc_program is not None else flags["disc"])

    def forward(self, u, delta, B, C, z=None, state=None, return_state=False, lengths=None):
        lengths = check_lengths(lengths, u)
        work, out_dtype = work_dtype(u, self.D), u.dtype
        with no_autocast(u):
            u, delta, B, C, z = (_as(t, work) for t in (u, delta, B, C, z))
            args = self._scan_args(work, z is not None)
            if lengths is not None:
                delta = self._mask_delta(delta, lengths, args)
            x0 = None if state is None else state["x"].to(work)
            if self.plan == "recurrent":
                y, x = self._loop(u, delta, B, C, z, x0, args)
            else:
                y, x = scan.selective_scan(u, delta, B=B, C=C, z=z, state=x0, return_state=True, **args)
        y = y.to(output_dtype(out_dtype, work))
        return (y, {"x": x}) if return_state else y

    @staticmethod
    def _mask_delta(delta, lengths, args):
        """Apply bias and softplus here, then zero delta past each length (dA = 1, dB u = 0 there)."""
        if args["delta_bias"] is not None:
            delta = delta + args["delta_bias"]
        if args["delta_softplus"]:
            delta = F.softplus(delta)
        args.update(delta_bias=None, delta_softplus=False)
        keep = torch.arange(delta.shape[1], device=delta.device)[None, :] < lengths[:, None]
        return torch.where(keep[..., None], delta, torch.zeros((), dtype=delta.dtype, device=delta.device))

    def _loop(self, u, delta, B, C, z, x, args):
        ys, zs = [], [None] * u.shape[1] if z is None else z.unbind(1)
        for u_t, delta_t, B_t, C_t, z_t in zip(u.unbind(1), delta.unbind(1), B.unbind(1), C.unbind(1), zs):
            y, x = scan.selective_scan_step(u_t, delta_t, B_t=B_t, C_t=C_t, z_t=z_t, state=x,
                                            discretize_fn=self.discretize_fn, **args)
            ys.append(y)
        if x is None:
            x = u.new_zeros(u.shape[0], u.shape[2], args["A"].shape[-1])
        return torch.stack(ys, 1), x

    def step(self, u_t, delta_t, B_t, C_t, z_t=None, state=None):
        work = work_dtype(u_t, self.D)
        with no_autocast(u_t):
            u, delta, B, C, z = (_as(t, work) for t in (u_t, delta_t, B_t, C_t, z_t))
            x = None if state is None else _as(state["x"], work)
            y, x = scan.selective_scan_step(u, delta, B_t=B, C_t=C, z_t=z, state=x, discretize_fn=self.discretize_fn,
                                            **self._scan_args(work, z is not None))
        return _as(y, output_dtype(u_t.dtype, work)), {"x": x}


__all__ = ["LAYERS", "Layer", "Pointwise", "Recurrent", "Linear", "Conv1d", "LayerNorm", "RMSNorm",
           "Embedding", "SSM", "SelectiveSSM", "LSTM", "Attention", "LinearSystem", "SYSTEMS", "powers",
           "linear_scan", "free_response", "causal_conv", "with_defaults", "check_lengths"]
