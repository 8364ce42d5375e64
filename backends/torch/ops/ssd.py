"""ssd (Mamba-2's state-space dual layer) and gated_rmsnorm as torch layers.

``SSD`` has both faces of the duality as plans (``seqc/ops/ssd.py`` has the math):

* ``scan``: the chunked SSD form as a fixed set of batched matmuls - scores
  ``C B^T`` per group (heads of a group share them, never repeated), the
  1-semiseparable decay mask per head, the chunk states, the chunk-to-chunk
  recurrence as one (chunks+1) x (chunks+1) decay matrix, and the states read
  back through C.  Padding to whole chunks uses dt = 0 (decay 1, no input).
* ``recurrent``: ``step`` in a loop over time (what decoding runs).

``lengths=``: dt is zeroed past each length, so the state stops there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import (Layer, Recurrent, accumulator_dtype, check_lengths, no_autocast, output_dtype, work_dtype)


def _prepare_dt(dt, dt_bias, softplus):
    dt = dt + dt_bias
    return F.softplus(dt) if softplus else dt


def ssd_chunked(x, dt, a, B, C, h0, chunk):
    """x (b, L, H, P), dt (b, L, H) (already biased and softplus'd), a (H,), B, C (b, L, G, N),
    h0 (b, H, P, N) or None -> y (b, L, H, P) without the D skip, final state (b, H, P, N)."""
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    pad = (-L) % chunk
    if pad:
        x, dt, B, C = (F.pad(t, (0,) * (2 * (t.dim() - 2)) + (0, pad)) for t in (x, dt, B, C))
    c, Q = (L + pad) // chunk, chunk
    xc = x.view(b, c, Q, H, P).permute(0, 1, 3, 2, 4)                    # (b, c, H, Q, P)
    dtc = dt.view(b, c, Q, H).permute(0, 1, 3, 2)                          # (b, c, H, Q)
    Bc = B.view(b, c, Q, G, N).permute(0, 1, 3, 2, 4)                      # (b, c, G, Q, N)
    Cc = C.view(b, c, Q, G, N).permute(0, 1, 3, 2, 4)
    cs = torch.cumsum(dtc * a[:, None], dim=-1)                            # (b, c, H, Q)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    seg = (cs[..., :, None] - cs[..., None, :]).masked_fill(~causal, float("-inf"))
    decay = torch.exp(seg)                                                 # (b, c, H, Q, Q)
    scores = Cc @ Bc.transpose(-1, -2)                                     # (b, c, G, Q, Q)
    xdt = xc * dtc[..., None]                                              # (b, c, H, Q, P)
    M = (decay.view(b, c, G, R, Q, Q) * scores[:, :, :, None])
    y = (M @ xdt.view(b, c, G, R, Q, P)).view(b, c, H, Q, P)              # diagonal blocks
    to_end = torch.exp(cs[..., -1:] - cs)                                  # (b, c, H, Q)
    states = (xdt * to_end[..., None]).transpose(-1, -2).reshape(b, c, G, R, P, Q) @ Bc[:, :, :, None]
    states = states.view(b, c, H, P * N)                                   # each chunk's own contribution
    if h0 is None:
        h0 = x.new_zeros(b, H, P, N)
    # chunk-to-chunk recurrence: start_k = sum_{j<=k} exp(sum of chunk totals j+1..k) S_j (S_0 = h0)
    total = F.pad(cs[..., -1].transpose(1, 2), (1, 0))                     # (b, H, c+1)
    csum = torch.cumsum(total, dim=-1)
    ksteps = c + 1
    lower = torch.ones(ksteps, ksteps, dtype=torch.bool, device=x.device).tril()
    W = torch.exp((csum[..., :, None] - csum[..., None, :]).masked_fill(~lower, float("-inf")))
    S = torch.cat([h0.reshape(b, 1, H, P * N), states], 1).transpose(1, 2)  # (b, H, c+1, P N)
    starts = (W @ S)                                                        # (b, H, c+1, P N)
    final = starts[:, :, -1].view(b, H, P, N)
    starts = starts[:, :, :-1].transpose(1, 2).reshape(b, c, G, R, P, N)
    y_off = (Cc[:, :, :, None] @ starts.transpose(-1, -2)).view(b, c, H, Q, P) * torch.exp(cs)[..., None]
    y = (y + y_off).permute(0, 1, 3, 2, 4).reshape(b, c * Q, H, P)[:, :L]
    return y, final


def ssd_step(x, dt, a, B, C, h):
    """One step: x (b, H, P), dt (b, H) (prepared), B, C (b, G, N), h (b, H, P, N) -> y (b, H, P), h."""
    b, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    R = H // G
    decay = torch.exp(dt * a)                                               # (b, H)
    Bh = B[:, :, None].expand(b, G, R, N).reshape(b, H, 1, N)
    Ch = C[:, :, None].expand(b, G, R, N).reshape(b, H, N, 1)
    h = decay[..., None, None] * h + (dt[..., None] * x)[..., None] * Bh
    return (h @ Ch).squeeze(-1), h


class SSD(Recurrent):
    """State ``ssm (B, heads, head_dim, d_state)``; plan "scan" (chunked) or "recurrent"."""

    op = "ssd"

    def __init__(self, in_features, attrs):
        super().__init__(in_features, attrs)
        self.plan = self.attrs["plan"]
        self.plan_for = None

    def state_dtype(self, dtype):
        return accumulator_dtype(dtype)

    def _split(self, x, B, C):
        H, P = self.A_log.shape[0], self.attrs["head_dim"]
        G, N = self.attrs["n_groups"], self.attrs["d_state"]
        lead = x.shape[:-1]
        return x.view(*lead, H, P), B.view(*lead, G, N), C.view(*lead, G, N)

    def _choose(self, x):
        plan = self.plan
        if plan == "auto":
            plan = (self.plan_for(x.shape[0], x.shape[1], torch.is_grad_enabled() and self.D.requires_grad)
                    if self.plan_for is not None else "scan")
        return plan

    def forward(self, x, dt, B, C, state=None, return_state=False, lengths=None):
        lengths = check_lengths(lengths, x)
        work, out_dtype = work_dtype(x, self.D), x.dtype
        with no_autocast(x):
            x, dt, B, C = (t.to(work) for t in (x, dt, B, C))
            dt = _prepare_dt(dt, self.dt_bias.to(work), self.attrs["dt_softplus"])
            if lengths is not None:
                keep = torch.arange(dt.shape[1], device=dt.device)[None, :] < lengths[:, None]
                dt = torch.where(keep[..., None], dt, torch.zeros((), dtype=dt.dtype, device=dt.device))
            a = -torch.exp(self.A_log.to(work))
            xh, Bg, Cg = self._split(x, B, C)
            h = None if state is None else state["ssm"].to(work)
            if self._choose(x) == "recurrent":
                if h is None:
                    h = x.new_zeros(x.shape[0], self.A_log.shape[0], self.attrs["head_dim"], self.attrs["d_state"])
                ys = []
                for t in range(x.shape[1]):
                    y_t, h = ssd_step(xh[:, t], dt[:, t], a, Bg[:, t], Cg[:, t], h)
                    ys.append(y_t)
                y = torch.stack(ys, 1)
            else:
                y, h = ssd_chunked(xh, dt, a, Bg, Cg, h, self.attrs["chunk"])
            y = (y + self.D.to(work)[:, None] * xh).reshape(x.shape)
        y = y.to(output_dtype(out_dtype, work))
        return (y, {"ssm": h}) if return_state else y

    def step(self, x_t, dt_t, B_t, C_t, state=None):
        work = work_dtype(x_t, self.D)
        with no_autocast(x_t):
            x, dt, B, C = (t.to(work) for t in (x_t, dt_t, B_t, C_t))
            dt = _prepare_dt(dt, self.dt_bias.to(work), self.attrs["dt_softplus"])
            xh, Bg, Cg = self._split(x, B, C)
            h = (x.new_zeros(x.shape[0], self.A_log.shape[0], self.attrs["head_dim"], self.attrs["d_state"])
                 if state is None else state["ssm"].to(work))
            y, h = ssd_step(xh, dt, -torch.exp(self.A_log.to(work)), Bg, Cg, h)
            y = (y + self.D.to(work)[:, None] * xh).reshape(x.shape)
        return y.to(output_dtype(x_t.dtype, work)), {"ssm": h}


class GatedRMSNorm(Layer):
    """RMSNorm of x * silu(z) per feature group, in at least float32, times weight."""

    op = "gated_rmsnorm"

    def forward(self, x, z):
        work = work_dtype(x, self.weight)
        g = x.to(work) * F.silu(z.to(work))
        parts = g.view(*g.shape[:-1], self.attrs["groups"], -1)
        parts = parts * torch.rsqrt(parts.pow(2).mean(-1, keepdim=True) + self.attrs["eps"])
        return (parts.view(g.shape) * self.weight.to(work)).to(output_dtype(x.dtype, work))
