"""ssd (Mamba-2's state-space dual layer) and gated_rmsnorm as torch layers.

``SSD`` has both faces of the duality as plans (``seqc/ops/ssd.py`` has the math):

* ``scan``: the chunked SSD form as a fixed set of batched matmuls - scores
  ``C B^T`` per group (heads of a group share them, never repeated), the
  1-semiseparable decay mask per head, the chunk states (the heads of a group
  stacked into one matmul), the chunk-to-chunk recurrence (L / chunk cheap
  elementwise steps), and the states read back through C.  Padding to whole chunks uses dt = 0 (decay 1, no input).
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
    xdt = (x * dt[..., None]).view(b, c, Q, H, P)                          # dt_s x_s, time-major
    Bc = B.view(b, c, Q, G, N).permute(0, 1, 3, 2, 4)                      # (b, c, G, Q, N)
    Cc = C.view(b, c, Q, G, N).permute(0, 1, 3, 2, 4)
    cs = torch.cumsum(dt.view(b, c, Q, H) * a, dim=2)                      # (b, c, Q, H): sum_{r<=t} dt_r a
    csT = cs.transpose(2, 3)                                               # (b, c, H, Q)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp((csT[..., :, None] - csT[..., None, :]).masked_fill(~causal, float("-inf")))
    scores = Cc @ Bc.transpose(-1, -2)                                     # (b, c, G, Q, Q), shared by R heads
    M = (decay.view(b, c, G, R, Q, Q) * scores[:, :, :, None]).view(b, c, H, Q, Q)
    y = M @ xdt.permute(0, 1, 3, 2, 4)                                     # diagonal blocks (b, c, H, Q, P)
    # each chunk's own end state: the heads of a group stacked into one (R P, Q) @ (Q, N) product
    w = xdt * torch.exp(cs[:, :, -1:] - cs)[..., None]
    S = (w.view(b, c, Q, G, R * P).permute(0, 1, 3, 4, 2) @ Bc).view(b, c, H, P, N)
    # chunk-to-chunk recurrence (few steps: L / chunk)
    carry = torch.exp(cs[:, :, -1])                                        # (b, c, H)
    h = x.new_zeros(b, H, P, N) if h0 is None else h0
    starts = []
    for carry_k, S_k in zip(carry.unbind(1), S.unbind(1)):    # unbind: its backward is one stack
        starts.append(h)
        h = carry_k[:, :, None, None] * h + S_k
    starts = torch.stack(starts, 1).view(b, c, G, R * P, N)
    y_off = (Cc @ starts.transpose(-1, -2)).view(b, c, G, Q, R, P)         # (b, c, G, Q, R, P)
    y_off = y_off.permute(0, 1, 3, 2, 4, 5).reshape(b, c, Q, H, P) * torch.exp(cs)[..., None]
    y = (y.permute(0, 1, 3, 2, 4) + y_off).reshape(b, c * Q, H, P)[:, :L]
    return y, h


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
            if h is None and (x.shape[1] == 0 or self._choose(x) == "recurrent"):
                h = x.new_zeros(x.shape[0], self.A_log.shape[0], self.attrs["head_dim"], self.attrs["d_state"])
            if x.shape[1] == 0:
                y = xh.clone()
            elif self._choose(x) == "recurrent":
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
        groups = self.attrs["groups"]      # (the group width spelled out: -1 is ambiguous for an empty chunk)
        parts = g.reshape(*g.shape[:-1], groups, g.shape[-1] // groups)
        parts = parts * torch.rsqrt(parts.pow(2).mean(-1, keepdim=True) + self.attrs["eps"])
        return (parts.view(g.shape) * self.weight.to(work)).to(output_dtype(x.dtype, work))
