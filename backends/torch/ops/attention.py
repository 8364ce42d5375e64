"""attention as a torch layer: multi-head attention through
F.scaled_dot_product_attention (is_causal for the plain causal case, a boolean
mask for caches, windows and padding; grouped-query heads through
``enable_gqa``), rotary embedding on q and k, and a KV cache as its state (the
layout and semantics are those of seqc.ops.attention)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqc.errors import SeqcError
from seqc.ops.attention import dims

from ..base import Recurrent, check_lengths

NO_STATE = ("bidirectional attention (causal = false) has no state: it needs the whole sequence at once, "
            "so step(), state= and return_state= are not available")


def rope_tables(positions, theta: float, width: int, dtype):
    """cos and sin of the rotary angles (transformers' Llama convention) at `positions` (B, L),
    (B, 1, L, width) in `dtype`, the angles computed in float64.  Under torch.compile an opaque
    custom op: inductor would otherwise fuse the float64 cos/sin into every element of q and k
    (heads times over) and recompute them in the backward, a third of Llama's step on CPU."""
    if torch.compiler.is_compiling():
        return tuple(_rope_tables_op(positions, theta, width, dtype))
    return _rope_tables(positions, theta, width, dtype)


def _rope_tables(positions, theta, width, dtype):
    inv_freq = 1.0 / theta ** (torch.arange(0, width, 2, dtype=torch.float64, device=positions.device) / width)
    freqs = positions.to(torch.float64)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)[:, None]                   # (B, 1, L, width)
    return emb.cos().to(dtype), emb.sin().to(dtype)


_rope_tables_op = torch.library.custom_op(
    "seqc::rope_tables", lambda *a: list(_rope_tables(*a)), mutates_args=(),
    schema="(Tensor positions, float theta, int width, ScalarType dtype) -> Tensor[]")


@_rope_tables_op.register_fake
def _(positions, theta, width, dtype):
    shape = (positions.shape[0], 1, positions.shape[1], width)
    return [positions.new_empty(shape, dtype=dtype), positions.new_empty(shape, dtype=dtype)]


def rotate(x, cos, sin):
    """Rotary embedding of x (B, H, L, hd) with tables (B, 1, L, width) from ``rope_tables``:
    x cos + rotate_half(x) sin on the first `width` features of each head (a rotary embedding
    of that width when it is less than hd), the rest unchanged."""
    width = cos.shape[-1]
    if width < x.shape[-1]:
        return torch.cat([rotate(x[..., :width], cos, sin), x[..., width:]], -1)
    x1, x2 = x[..., :width // 2], x[..., width // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(Recurrent):
    """Multi-head attention (causal: equal to F.scaled_dot_product_attention(is_causal=True)
    in the default configuration); the state is a KV cache that later chunks and steps attend over."""

    op = "attention"
    optional_state = ("valid",)       # state keys a call may add beyond init_state's (ragged lengths)
    PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

    def _build(self, shapes):
        for name in self.PROJECTIONS:
            out_f, in_f = shapes[f"{name}.weight"]
            proj = nn.Linear(in_f, out_f, bias=f"{name}.bias" in shapes)
            nn.init.zeros_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
            self.add_module(name, proj)
        a = self.attrs
        self.heads, self.kv_heads, self.head_dim = dims(self.in_features[0], a)
        self.causal, self.window, self.rope = bool(a["causal"]), int(a["window"]), bool(a["rope"])

    def init_state(self, batch, dtype=torch.float32, device=None):
        if not self.causal:
            raise SeqcError(NO_STATE)
        empty = torch.zeros(batch, self.kv_heads, 0, self.head_dim, dtype=dtype, device=device)
        state = {"k": empty, "v": empty.clone()}
        if self.rope:
            state["pos"] = torch.zeros(batch, dtype=dtype, device=device)
        return state

    def step(self, *inputs_t, state=None):
        if not self.causal:
            raise SeqcError(NO_STATE)
        return super().step(*inputs_t, state=state)

    def _split(self, x, heads):
        b, t, _ = x.shape
        return x.view(b, t, heads, self.head_dim).transpose(1, 2)

    def forward(self, x, state=None, return_state=False, lengths=None):
        lengths = check_lengths(lengths, x)
        batch, length, _ = x.shape
        if not self.causal and (state is not None or return_state):
            raise SeqcError(NO_STATE)
        q = self._split(self.q_proj(x), self.heads)
        k, v = self._split(self.k_proj(x), self.kv_heads), self._split(self.v_proj(x), self.kv_heads)
        past = 0 if state is None else state["k"].shape[2]
        past_valid = None if state is None else state.get("valid")
        if self.rope:
            pos = x.new_zeros(batch) if state is None else state["pos"].to(x.dtype)
            positions = pos[:, None] + torch.arange(length, device=x.device, dtype=x.dtype)
            rd = int(self.attrs["rope_dim"])
            width = rd if 0 < rd < q.shape[-1] else q.shape[-1]
            cos, sin = rope_tables(positions, float(self.attrs["rope_theta"]), width, q.dtype)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if state is not None:
            k = torch.cat([state["k"].to(k.dtype), k], 2)
            v = torch.cat([state["v"].to(v.dtype), v], 2)
        gqa = self.kv_heads != self.heads
        if not self.causal:
            mask = None if lengths is None else \
                (torch.arange(length, device=x.device) < lengths[:, None])[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        elif state is None and not self.window:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(past, length, past_valid, x.device),
                                                 enable_gqa=gqa)
        y = self.o_proj(out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))
        if not return_state:
            return y
        return y, self._new_state(k, v, past_valid, lengths, length, None if not self.rope else pos)

    def _mask(self, past, length, past_valid, device):
        """(L, P+L) or (B, 1, L, P+L) bool: causal (and windowed) over cache + chunk, valid cached keys."""
        j = torch.arange(past + length, device=device)[None, :]
        i = past + torch.arange(length, device=device)[:, None]
        mask = j <= i
        if self.window:
            mask = mask & (j > i - self.window)
        if past_valid is None:
            return mask
        batch = past_valid.shape[0]
        valid = torch.cat([past_valid, past_valid.new_ones(batch, length)], 1)
        return (mask[None] & valid[:, None, :])[:, None]

    def _new_state(self, k, v, past_valid, lengths, length, pos):
        """The cache after this chunk: padding moved to the left (each row's real keys contiguous,
        ending at the last position), trimmed to the window, and the position counter."""
        batch, total = k.shape[0], k.shape[2]
        new = {"k": k, "v": v}
        if lengths is not None or past_valid is not None:
            if past_valid is None:
                past_valid = torch.ones(batch, total - length, dtype=torch.bool, device=k.device)
            now = torch.arange(length, device=k.device)[None, :] < (length if lengths is None else lengths[:, None])
            valid = torch.cat([past_valid, now.expand(batch, length)], 1)
            if lengths is not None:      # stable sort: padding first, real keys keep their order
                order = torch.argsort(valid.to(torch.int8), dim=1, stable=True)
                index = order[:, None, :, None].expand_as(k)
                new = {"k": k.gather(2, index), "v": v.gather(2, index)}
                valid = valid.gather(1, order)
            new["valid"] = valid
        if self.window:
            keep = max(total - (self.window - 1), 0)
            new = {n: t[:, :, keep:] if t.dim() == 4 else t[:, keep:] for n, t in new.items()}
        if pos is not None:
            new["pos"] = pos + (length if lengths is None else lengths.to(pos.dtype))
        return new
