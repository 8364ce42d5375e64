"""gru as a torch layer: torch.nn.GRU(batch_first=True) semantics on the
registry's parameters through the same fused kernel (``torch.gru``); packed
sequences for ``lengths=`` (rows of length 0 output zeros and keep their state); under
torch.compile the kernel call is an intended graph break (``outside_compile``)."""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..base import Recurrent, check_lengths, outside_compile


class GRU(Recurrent):
    """State ``h (B, layers, hidden)``; ``step`` is forward on one token."""

    op = "gru"
    eager_under_compile = True

    def flat_weights(self) -> list:
        names = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if self.attrs["bias"] else ())
        return [getattr(self, f"{n}_l{k}") for k in range(self.attrs["layers"]) for n in names]

    def forward(self, x, state=None, return_state=False, lengths=None):
        lengths = check_lengths(lengths, x)
        if state is None:
            state = self.init_state(x.shape[0], x.dtype, x.device)
        hx = state["h"].transpose(0, 1).to(x.dtype).contiguous()
        common = (self.flat_weights(), self.attrs["bias"], self.attrs["layers"], 0.0, self.training, False)
        if lengths is None:
            y, h = outside_compile(torch.gru, x, hx, *common, True)
        else:
            y, h = outside_compile(self._packed, x, hx, lengths, common)
        return (y, {"h": h.transpose(0, 1)}) if return_state else y

    @classmethod
    def _packed(cls, x, hx, lengths, common):
        live = lengths > 0
        if not bool(live.all()):
            rows = live.nonzero().squeeze(1)
            y, h = x.new_zeros(x.shape[:2] + (hx.shape[-1],)), hx.clone()
            if rows.numel():
                y_live, h_live = cls._packed(x[rows], hx[:, rows], lengths[rows], common)
                y, h = y.index_copy(0, rows, y_live), h.index_copy(1, rows, h_live)
            return y, h
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        order, back = packed.sorted_indices, packed.unsorted_indices
        data, h = torch.gru(packed.data, packed.batch_sizes, hx.index_select(1, order).contiguous(), *common)
        y, _ = pad_packed_sequence(PackedSequence(data, packed.batch_sizes, order, back),
                                   batch_first=True, total_length=x.shape[1])
        return y, h.index_select(1, back)
