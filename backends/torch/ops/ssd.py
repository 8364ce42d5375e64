"""ssd (Mamba-2's state-space dual layer) and gated_rmsnorm as torch layers.

``SSD`` has both faces of the duality as plans (``seqc/ops/ssd.py`` has the math):

* ``scan``: the chunked SSD form as a fixed set of batched matmuls - scores
  ``C B^T`` per group (heads of a group share them, never repeated), the
  1-semiseparable decay mask per head, the chunk states (the heads of a group
  stacked into one matmul), the chunk-to-chunk recurrence (L / chunk cheap
  elementwise steps), and the states read back through C.  Padding to whole chunks uses dt = 0 (decay 1, no input).
  One core with a hand-written backward (``FusedCore``), the D skip included; under
  torch.compile a custom op, so the model stays one graph for every length.
* ``recurrent``: ``step`` in a loop over time (what decoding runs).

``lengths=``: dt is zeroed past each length, so the state stops there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import (Layer, Recurrent, accumulator_dtype, check_lengths, no_autocast, output_dtype, pad_time,
                    work_dtype)
from ..fused import FusedCore


def _prepare_dt(dt, dt_bias, softplus):
    dt = dt + dt_bias
    return F.softplus(dt) if softplus else dt


def _chunked_forward(x, dt, a, B, C, D, h0, chunk):
    """The chunked SSD form, all chunks at once.  x (b, L, H, P), dt (b, L, H) (prepared),
    a (H,), B, C (b, L, G, N), D (H,) or None, h0 (b, H, P, N) or None -> (y (b, L, H, P) with
    the D skip, final state (b, H, P, N)) and the intermediates the backward reads: the decay
    and mixing matrices of the diagonal blocks and the chunk start states, nothing stored twice.
    The causal mask is applied to the scores ``C B^T`` (shared by the heads of a group) and the
    decay exponent is masked to 0 before exp, never to -inf (exp(-inf) takes a slow path on CPU)."""
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R, Q = H // G, chunk
    pad = (-L) % Q
    c = (L + pad) // Q
    xq = pad_time(x, pad).reshape(b, c, Q, H, P)
    dtq = pad_time(dt, pad).reshape(b, c, Q, H)
    cs = torch.cumsum(dtq * a, 2)                                          # (b, c, Q, H)
    Xt = xq * dtq[..., None]                                               # dt x, time-major
    Xh = Xt.permute(0, 1, 3, 2, 4).contiguous()                            # (b, c, H, Q, P)
    Bc = pad_time(B, pad).reshape(b, c, Q, G, N).transpose(2, 3).contiguous()   # (b, c, G, Q, N)
    Cc = pad_time(C, pad).reshape(b, c, Q, G, N).transpose(2, 3).contiguous()
    csh = cs.transpose(2, 3)
    decay = torch.sub(csh[..., :, None], csh[..., None, :], out=cs.new_empty(b, c, H, Q, Q))
    upper = torch.ones(Q, Q, dtype=torch.bool, device=x.device).triu_(1)
    decay.masked_fill_(upper, 0.0).exp_()
    scores = (Cc @ Bc.transpose(-1, -2)).masked_fill_(upper, 0.0)          # (b, c, G, Q, Q)
    M = torch.empty_like(decay)
    torch.mul(decay.view(b, c, G, R, Q, Q), scores[:, :, :, None], out=M.view(b, c, G, R, Q, Q))
    Yd = M @ Xh                                                            # (b, c, H, Q, P)
    last = cs[:, :, -1]                                                    # (b, c, H)
    wd = torch.exp(last[:, :, None] - cs)                                  # (b, c, Q, H)
    XW = Xt * wd[..., None]                                                # (b, c, Q, H, P)
    W = XW.view(b, c, Q, G, R * P).transpose(2, 3)                          # (b, c, G, Q, R P)
    S = Bc.transpose(-1, -2) @ W                                           # (b, c, G, N, R P)
    carry = torch.exp(last)
    cg = carry.view(b, c, G, 1, R, 1)
    starts = S.new_empty(b, c, G, N, R * P)
    if h0 is None:
        starts[:, 0] = 0
    else:
        starts[:, 0] = h0.view(b, G, R, P, N).permute(0, 1, 4, 2, 3).reshape(b, G, N, R * P)
    h = None
    for k in range(c):
        nxt = torch.addcmul(S[:, k].view(b, G, N, R, P), starts[:, k].view(b, G, N, R, P), cg[:, k])
        if k + 1 < c:
            starts[:, k + 1] = nxt.view(b, G, N, R * P)
        else:
            h = nxt
    U = Cc @ starts                                                        # (b, c, G, Q, R P)
    E = torch.exp(cs)
    y = U.view(b, c, G, Q, R, P).permute(0, 1, 3, 2, 4, 5).reshape(b, c, Q, H, P) * E[..., None]
    y += Yd.permute(0, 1, 3, 2, 4)
    y = y.view(b, c * Q, H, P)
    if pad:
        y = y[:, :L].contiguous()
    if D is not None:
        y.addcmul_(x, D[:, None])
    h = h.permute(0, 1, 3, 4, 2).reshape(b, H, P, N)
    return (y, h), (Bc, Cc, Xt, Xh, decay, M, wd, XW, starts, U, E, carry)


def _chunked_backward(inputs, saved, grads, options):
    """The gradients of ``_chunked_forward`` (x, dt, a, B, C, D, h0; None for an absent one)."""
    x, dt, a, B, C, D, h0 = inputs
    Bc, Cc, Xt, Xh, decay, M, wd, XW, starts, U, E, carry = saved
    dy, dh = grads
    (Q,) = options
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R, c = H // G, Bc.shape[1]
    pad = c * Q - L
    W = XW.view(b, c, Q, G, R * P).transpose(2, 3)                          # (b, c, G, Q, R P)
    dyq = pad_time(dy, pad).reshape(b, c, Q, H, P)
    # off-diagonal part y = E (C . starts)
    dE = (dyq.view(b, c, Q, G, R, P) * U.view(b, c, G, Q, R, P).transpose(2, 3)).sum(-1).view(b, c, Q, H)
    dcs = dE * E
    dU = (dyq * E[..., None]).view(b, c, Q, G, R * P).transpose(2, 3)      # (b, c, G, Q, R P)
    dCc = dU @ starts.transpose(-1, -2)
    dstarts = Cc.transpose(-1, -2) @ dU                                    # (b, c, G, N, R P)
    cg = carry.view(b, c, G, 1, R, 1)
    g = dh.view(b, G, R, P, N).permute(0, 1, 4, 2, 3)                     # (b, G, N, R, P)
    dS = torch.empty_like(starts)
    for k in range(c - 1, -1, -1):
        dS[:, k] = g.reshape(b, G, N, R * P)
        g = torch.addcmul(dstarts[:, k].view(b, G, N, R, P), g, cg[:, k])
    dh0 = g.permute(0, 1, 3, 4, 2).reshape(b, H, P, N) if h0 is not None else None
    dlast = (dS.view(b, c, G, N, R, P) * starts.view(b, c, G, N, R, P)).sum((3, 5)).view(b, c, H) * carry
    # chunk states S = B^T W
    dW = Bc @ dS                                                           # (b, c, G, Q, R P)
    dBc = W @ dS.transpose(-1, -2)
    dWt = dW.transpose(2, 3).reshape(b, c, Q, H, P)
    dXt = dWt * wd[..., None]
    t = (dWt * Xt).sum(-1) * wd
    dcs -= t
    dlast += t.sum(2)
    dcs[:, :, -1] += dlast
    # diagonal blocks y = M Xh, M = decay * scores
    dYh = dyq.permute(0, 1, 3, 2, 4).contiguous()
    dM = dYh @ Xh.transpose(-1, -2)                                        # (b, c, H, Q, Q)
    dXt += (M.transpose(-1, -2) @ dYh).permute(0, 1, 3, 2, 4)
    dscores = (dM.view(b, c, G, R, Q, Q) * decay.view(b, c, G, R, Q, Q)).sum(3)
    dscores.masked_fill_(torch.ones(Q, Q, dtype=torch.bool, device=x.device).triu_(1), 0.0)
    dM *= M
    dcs += (dM.sum(-1) - dM.sum(-2)).transpose(2, 3)
    dCc += dscores @ Bc
    dBc += dscores.transpose(-1, -2) @ Cc
    # cs = cumsum(dt a), Xt = dt x
    dA = dcs.flip(2).cumsum(2).flip(2)
    dtq = pad_time(dt, pad).reshape(b, c, Q, H)
    xq = pad_time(x, pad).reshape(b, c, Q, H, P)
    ddt = (dA * a + (dXt * xq).sum(-1)).view(b, c * Q, H)[:, :L]
    da = (dA * dtq).sum((0, 1, 2))
    dx = (dXt * dtq[..., None]).view(b, c * Q, H, P)[:, :L]
    dD = None
    if D is not None:
        dx = dx.addcmul(dy, D[:, None])
        dD = (dy * x).sum((0, 1, 3))
    dB = dBc.transpose(2, 3).reshape(b, c * Q, G, N)[:, :L]
    dC = dCc.transpose(2, 3).reshape(b, c * Q, G, N)[:, :L]
    return dx, ddt, da, dB, dC, dD, dh0


def _chunked_fake(x, dt, a, B, C, D, h0, chunk):
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R, Q = H // G, chunk
    c = (L + Q - 1) // Q
    shapes = ((b, L, H, P), (b, H, P, N),
              (b, c, G, Q, N), (b, c, G, Q, N), (b, c, Q, H, P), (b, c, H, Q, P), (b, c, H, Q, Q), (b, c, H, Q, Q),
              (b, c, Q, H), (b, c, Q, H, P), (b, c, G, N, R * P), (b, c, G, Q, R * P), (b, c, Q, H), (b, c, H))
    return [x.new_empty(s) for s in shapes]


_CHUNKED = FusedCore("ssd_chunked", "Tensor x, Tensor dt, Tensor a, Tensor B, Tensor C, Tensor? D, Tensor? h0, int chunk",
                     _chunked_forward, _chunked_backward, _chunked_fake, n_outputs=2)


def ssd_chunked(x, dt, a, B, C, h0, chunk, D=None):
    """x (b, L, H, P), dt (b, L, H) (already biased and softplus'd), a (H,), B, C (b, L, G, N),
    h0 (b, H, P, N) or None, D (H,) or None -> y (b, L, H, P) (plus D x), final state (b, H, P, N).
    One core with a hand-written backward (``FusedCore``): under torch.compile a custom op,
    no graph break, one graph for every length.  L >= 1."""
    return _CHUNKED(x, dt, a, B, C, D, h0, chunk)


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
            plan = "recurrent" if x.shape[1] == 0 else self._choose(x)
            if plan == "recurrent":
                if h is None:
                    h = x.new_zeros(x.shape[0], self.A_log.shape[0], self.attrs["head_dim"], self.attrs["d_state"])
                ys = []
                for t in range(x.shape[1]):
                    y_t, h = ssd_step(xh[:, t], dt[:, t], a, Bg[:, t], Cg[:, t], h)
                    ys.append(y_t)
                y = torch.stack(ys, 1) if ys else xh.clone()
                y = y + self.D.to(work)[:, None] * xh
            else:
                y, h = ssd_chunked(xh, dt, a, Bg, Cg, h, self.attrs["chunk"], self.D.to(work))
            y = y.reshape(x.shape)
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
