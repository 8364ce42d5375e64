"""lstm as a torch layer: torch.nn.LSTM(batch_first=True) semantics on the
registry's parameters through the same fused kernel (``torch.lstm``), packed
sequences for ``lengths=``; under torch.compile the kernel call is an intended graph break
(``outside_compile``)."""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..base import Recurrent, check_lengths, outside_compile


class LSTM(Recurrent):
    """torch.nn.LSTM(batch_first=True) on our own parameters, via the same fused kernel."""

    op = "lstm"
    eager_under_compile = True

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
            y, h, c = outside_compile(torch.lstm, x, (hx[0].contiguous(), hx[1].contiguous()), *common, True)
        else:
            y, h, c = outside_compile(self._packed, x, hx, lengths, common)
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
