"""mean / sum / max / last over time (running, causal, with state and lengths=) or
over features, as torch layers: cumulative sums / cummax over the sequence."""
from __future__ import annotations

import torch

from ..base import Recurrent, check_lengths


class _Reduce(Recurrent):
    how = ""

    def forward(self, x, state=None, return_state=False, lengths=None):
        lengths = check_lengths(lengths, x)
        batch, length = x.shape[0], x.shape[1]
        live = None if lengths is None else \
            (torch.arange(length, device=x.device)[None, :] < lengths.to(x.device)[:, None])[..., None]
        if self.attrs["dim"] == "features":
            y = {"mean": lambda: x.mean(-1, keepdim=True), "sum": lambda: x.sum(-1, keepdim=True),
                 "max": lambda: x.amax(-1, keepdim=True), "last": lambda: x[..., -1:]}[self.how]()
            if live is not None:
                y = torch.where(live, y, torch.zeros_like(y))
            return (y, {}) if return_state else y
        if state is None:
            state = self.init_state(batch, x.dtype, x.device)
        on = torch.ones_like(x[..., :1], dtype=torch.bool) if live is None else live
        zero = torch.zeros_like(x)
        if self.how == "last":
            prev = state["last"].to(x.dtype)
            if lengths is None:
                new = {"last": x[:, -1]}
            else:
                n = lengths.to(x.device)
                at = x[torch.arange(batch, device=x.device), (n - 1).clamp_min(0)]
                new = {"last": torch.where((n > 0)[:, None], at, prev)}
            y = torch.where(on, x, zero)
        elif self.how == "max":
            seen = state["count"].to(x.dtype)                                  # (B, 1)
            prev = torch.where(seen > 0, state["max"].to(x.dtype), torch.full_like(state["max"], -torch.inf,
                                                                                  dtype=x.dtype))
            run = torch.maximum(torch.cummax(torch.where(on, x, -torch.inf), 1).values, prev[:, None])
            count = seen + on.to(x.dtype).sum(1)
            new = {"max": torch.where(count > 0, run[:, -1], state["max"].to(x.dtype)), "count": count}
            y = torch.where(on, run, zero)
        else:
            run = state["sum"].to(x.dtype)[:, None] + torch.cumsum(torch.where(on, x, zero), 1)
            new = {"sum": run[:, -1]}
            if self.how == "mean":
                counts = state["count"].to(x.dtype)[:, None] + torch.cumsum(on.to(x.dtype), 1)
                new["count"] = counts[:, -1]
                run = run / counts.clamp_min(1)
            y = torch.where(on, run, zero)
        return (y, new) if return_state else y


class Mean(_Reduce):
    op = how = "mean"


class Sum(_Reduce):
    op = how = "sum"


class Max(_Reduce):
    op = how = "max"


class Last(_Reduce):
    op = how = "last"
