"""The torch runtime layers: one ``nn.Module`` per registry op with weights or state.

``LAYERS[op](in_features, attrs)`` builds a layer; ``in_features[k]`` is the
last dimension of input k and ``attrs`` the node's attributes (registry
defaults fill the missing ones).  Parameters carry exactly the registry's
weight names and shapes, initialised to zeros (the compile step loads values).

Every layer has ``forward(*inputs, state=None, return_state=False, lengths=None)``
(returning ``y`` or ``(y, final_state)``), ``init_state(batch, dtype, device)``
and ``step(*inputs_t, state) -> (y_t, new_state)``.  States are dicts of
tensors, batch first, in the layouts of ``backends/numpy/ops.py``:

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
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from seqc.errors import SeqcError

from . import scan
from .base import (Layer, Pointwise, Recurrent, accumulator_dtype, check_lengths, no_autocast, output_dtype,
                   with_defaults, work_dtype)
from .functional import activation
from .lti import SYSTEMS, SSM, LinearSystem, causal_conv, free_response, linear_scan, powers

# -- pointwise layers -----------------------------------------------------------------------


class Linear(Pointwise):
    op = "linear"

    def map(self, x):
        return F.linear(x, self.weight, getattr(self, "bias", None))


class LayerNorm(Pointwise):
    op = "layernorm"

    def map(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, getattr(self, "bias", None), self.attrs["eps"])


class RMSNorm(Pointwise):
    op = "rmsnorm"

    def map(self, x):
        """x * rsqrt(mean(x^2) + eps) * weight, computed in at least float32."""
        work = work_dtype(x, self.weight)
        xw = x.to(work)
        y = xw * torch.rsqrt(xw.pow(2).mean(-1, keepdim=True) + self.attrs["eps"]) * self.weight.to(work)
        return y.to(output_dtype(x.dtype, work))


class Embedding(Pointwise):
    op = "embedding"

    def map(self, tokens):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex:
            raise SeqcError(f"embedding needs integer tokens, got {tokens.dtype}")
        return F.embedding(tokens, self.weight)


# -- conv1d ----------------------------------------------------------------------------------


class Conv1d(Recurrent):
    """Causal depthwise convolution over time (torch Conv1d groups=D layout), then `activation`."""

    op = "conv1d"

    def forward(self, x, state=None, return_state=False, lengths=None):
        lengths = check_lengths(lengths, x)
        batch, length, d = x.shape
        taps = self.weight.shape[-1]
        window = (x.new_zeros(batch, d, taps - 1) if state is None else state["window"].to(x.dtype))
        padded = torch.cat([window, x.transpose(1, 2)], -1)                # (B, D, K-1+L)
        y = F.conv1d(padded, self.weight, getattr(self, "bias", None), groups=d)
        y = activation(self.attrs["activation"])(y).transpose(1, 2)
        if not return_state:
            return y
        return y, {"window": self._last_inputs(padded, lengths, taps - 1)}

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


# -- selective ssm ------------------------------------------------------------------------------


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

    def configure(self, call):
        """Take the lowered call's discretization program and fusion region."""
        base = getattr(super(), "configure", None)
        if base is not None:
            base(call)
        self.region = getattr(call, "region", None)
        self.set_discretization(getattr(call, "disc", None))

    def set_discretization(self, program):
        self.disc_program = program
        self.discretize_fn = None if program is None else program.compile("torch")

    def state_dtype(self, dtype):
        return accumulator_dtype(dtype)

    def _scan_args(self, work, gate=False):
        flags = scan.kernel_flags(self.attrs, self.region, gate)
        return dict(A=-torch.exp(self.A_log.to(work)), D=self.D.to(work) if flags["d_skip"] else None,
                    delta_bias=self.delta_bias.to(work) if flags["delta_bias"] else None,
                    delta_softplus=flags["delta_softplus"],
                    disc=self.disc_program if self.disc_program is not None else flags["disc"])

    def forward(self, u, delta, B, C, z=None, state=None, return_state=False, lengths=None):
        lengths = check_lengths(lengths, u)
        work, out_dtype = work_dtype(u, self.D), u.dtype
        with no_autocast(u):
            u, delta, B, C, z = (None if t is None else t.to(work) for t in (u, delta, B, C, z))
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
            u, delta, B, C, z = (None if t is None else t.to(work) for t in (u_t, delta_t, B_t, C_t, z_t))
            x = None if state is None else state["x"].to(work)
            y, x = scan.selective_scan_step(u, delta, B_t=B, C_t=C, z_t=z, state=x, discretize_fn=self.discretize_fn,
                                            **self._scan_args(work, z is not None))
        return y.to(output_dtype(u_t.dtype, work)), {"x": x}


# -- lstm -------------------------------------------------------------------------------------


class LSTM(Recurrent):
    """torch.nn.LSTM(batch_first=True) on our own parameters, via the same fused kernel."""

    op = "lstm"

    def flat_weights(self) -> list:
        names = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if self.attrs["bias"] else ())
        return [getattr(self, f"{n}_l{k}") for k in range(self.attrs["layers"]) for n in names]

    def forward(self, x, state=None, return_state=False, lengths=None):
        lengths = check_lengths(lengths, x)
        if state is None:
            state = self.init_state(x.shape[0], x.dtype, x.device)
        hx = (state["h"].transpose(0, 1).to(x.dtype), state["c"].transpose(0, 1).to(x.dtype))
        common = (self.flat_weights(), self.attrs["bias"], self.attrs["layers"], 0.0, self.training, False)
        if lengths is None:
            y, h, c = torch.lstm(x, (hx[0].contiguous(), hx[1].contiguous()), *common, True)
        else:
            y, h, c = self._packed(x, hx, lengths, common)
        return (y, {"h": h.transpose(0, 1), "c": c.transpose(0, 1)}) if return_state else y

    @classmethod
    def _packed(cls, x, hx, lengths, common):
        """Packed sequences; rows of length 0 (packing refuses them) output zeros and keep their state."""
        live = lengths > 0
        if not bool(live.all()):
            rows = live.nonzero().squeeze(1)
            y = x.new_zeros(x.shape[:2] + (hx[0].shape[-1],))
            h, c = hx[0].clone(), hx[1].clone()
            if rows.numel():
                y_live, h_live, c_live = cls._packed(x[rows], (hx[0][:, rows], hx[1][:, rows]), lengths[rows], common)
                y, h, c = y.index_copy(0, rows, y_live), h.index_copy(1, rows, h_live), c.index_copy(1, rows, c_live)
            return y, h, c
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        order, back = packed.sorted_indices, packed.unsorted_indices
        hx = tuple(s.index_select(1, order).contiguous() for s in hx)
        data, h, c = torch.lstm(packed.data, packed.batch_sizes, hx, *common)
        y, _ = pad_packed_sequence(PackedSequence(data, packed.batch_sizes, order, back),
                                   batch_first=True, total_length=x.shape[1])
        return y, h.index_select(1, back), c.index_select(1, back)


# -- attention -----------------------------------------------------------------------------------


class Attention(Recurrent):
    """Causal multi-head attention equal to F.scaled_dot_product_attention(is_causal=True);
    the state is a KV cache that later chunks and steps attend over."""

    op = "attention"
    PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

    def _build(self, shapes):
        for name in self.PROJECTIONS:
            out_f, in_f = shapes[f"{name}.weight"]
            proj = nn.Linear(in_f, out_f, bias=f"{name}.bias" in shapes)
            nn.init.zeros_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
            self.add_module(name, proj)
        d, heads = self.in_features[0], self.attrs["heads"]
        if d % heads:
            raise SeqcError(f"{d} features do not divide into {heads} heads")
        self.heads, self.head_dim = heads, d // heads

    def init_state(self, batch, dtype=torch.float32, device=None):
        empty = torch.zeros(batch, self.heads, 0, self.head_dim, dtype=dtype, device=device)
        return {"k": empty, "v": empty.clone()}

    def _split(self, x):
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, state=None, return_state=False, lengths=None):
        lengths = check_lengths(lengths, x)
        batch, length, d = x.shape
        q, k, v = (self._split(getattr(self, p)(x)) for p in self.PROJECTIONS[:3])
        if state is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            past_valid = x.new_ones(batch, 0, dtype=torch.bool)
        else:
            k = torch.cat([state["k"].to(k.dtype), k], 2)
            v = torch.cat([state["v"].to(v.dtype), v], 2)
            past = state["k"].shape[2]
            past_valid = state.get("valid", x.new_ones(batch, past, dtype=torch.bool))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(past_valid, length))
        y = self.o_proj(out.transpose(1, 2).reshape(batch, length, d))
        if not return_state:
            return y
        new_state = {"k": k, "v": v}
        if lengths is not None or (state is not None and "valid" in state):
            now = torch.arange(length, device=x.device)[None, :] < (length if lengths is None else lengths[:, None])
            new_state["valid"] = torch.cat([past_valid, now.expand(batch, length)], 1)
        return y, new_state

    @staticmethod
    def _mask(past_valid, length):
        """(B, 1, L, P+L) bool: the valid cached keys plus the causal part over the new ones."""
        batch, past = past_valid.shape
        device = past_valid.device
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        cached = past_valid[:, None, None, :].expand(batch, 1, length, past)
        return torch.cat([cached, causal.expand(batch, 1, length, length)], -1)


LAYERS = {cls.op: cls for cls in (Linear, Conv1d, LayerNorm, RMSNorm, Embedding, SSM, SelectiveSSM, LSTM, Attention)}

__all__ = ["LAYERS", "Layer", "Pointwise", "Recurrent", "Linear", "Conv1d", "LayerNorm", "RMSNorm",
           "Embedding", "SSM", "SelectiveSSM", "LSTM", "Attention", "LinearSystem", "SYSTEMS", "powers",
           "linear_scan", "free_response", "causal_conv", "with_defaults", "check_lengths"]
