"""attention as a torch layer: causal multi-head attention through
F.scaled_dot_product_attention, with a KV cache as its state."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqc.errors import SeqcError

from ..base import Recurrent, check_lengths


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
