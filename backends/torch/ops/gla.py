"""gla as a torch layer: gated linear attention (GLA), RetNet's fixed decay or plain
causal linear attention (``decay``) with a matrix state ``S (B, heads, dk, dv)``.

Plans: ``scan`` (chunked) - chunks of ``CHUNK`` steps, all at once; within a chunk the
output is a masked score matrix ``A[t, s] = sum_k q_tk k_sk exp(b_tk - b_sk)`` (b the
cumulative log decay, every exponent <= 0) times v, plus ``(q_t exp(b_t)) S`` from the
state carried between chunks (one elementwise step per chunk).  It is one core with a
hand-written backward (``FusedCore``): under torch.compile a custom op, so the model
stays one graph for every length.  ``recurrent`` - the recurrence one step at a time,
which loops over the length in Python, so under torch.compile it runs eagerly in an
intended graph break (``eager_when_compiled``).  ``norm`` (group / rms) normalises each head's output before ``o_proj``
(absent with ``o_proj = false``).  ``lengths=``: past a sequence's end k = 0 and alpha = 1, so the
final state is the state after exactly that many steps.  The state accumulates
in float32 (float64 for float64 inputs)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqc.ops.gla import TORCH_CHUNK as CHUNK, retnet_log_gamma

from ..base import (Recurrent, accumulator_dtype, check_lengths, eager_when_compiled, no_autocast, output_dtype,
                    pad_time, work_dtype)
from ..fused import FusedCore



def _by_chunk(t, pad, c, Q):
    """(B, L, H, X) -> (B, c, H, Q, X), padded with zeros to c * Q steps (no input, decay 1)."""
    b, _, H, X = t.shape
    return pad_time(t, pad).view(b, c, Q, H, X).transpose(2, 3).contiguous()


def _by_time(t, L):
    """(B, c, H, Q, X) -> (B, L, H, X)."""
    b, c, H, Q, X = t.shape
    return t.transpose(2, 3).reshape(b, c * Q, H, X)[:, :L]


def _chunked_forward(q, k, v, log_alpha, S0, chunk):
    """All chunks at once: b the cumulative log decay within each chunk, the decay tensor
    ``Dm[t, s, k] = exp(b_tk - b_sk)`` for s <= t (the exponent masked to 0 above the diagonal
    before exp: never exp(-inf), never an overflow; the scores and their gradient are masked
    instead, (Q, Q) rather than (Q, Q, dk)), scores ``A = sum_k q k Dm``, the intra-chunk output ``A v``;
    the chunk states ``Sc = (k exp(b_T - b))^T v`` and the start states by the recurrence
    ``S <- exp(b_T) S + Sc`` (one elementwise step per chunk); the inter-chunk output
    ``(q exp(b)) S_start``."""
    b, L, H, K = q.shape
    V, Q = v.shape[-1], chunk
    pad = (-L) % Q
    c = (L + pad) // Q
    qh, kh, vh, lh = (_by_chunk(t, pad, c, Q) for t in (q, k, v, log_alpha))
    bh = lh.cumsum(3)                                                      # (B, c, H, Q, K)
    upper = torch.ones(Q, Q, dtype=torch.bool, device=q.device).triu_(1)
    Dm = torch.sub(bh[..., :, None, :], bh[..., None, :, :])                 # (B, c, H, Q, Q, K)
    Dm.masked_fill_(upper[:, :, None], 0.0).exp_()          # upper triangle: 1 (masked in A and dA)
    A = torch.einsum("bchtsk,bchsk,bchtk->bchts", Dm, kh, qh).masked_fill_(upper, 0.0)
    ke = kh * torch.exp(bh[..., -1:, :] - bh)
    Sc = ke.transpose(-1, -2) @ vh                                          # (B, c, H, K, V)
    carry = torch.exp(bh[..., -1, :])                                       # (B, c, H, K)
    starts = Sc.new_empty(b, c, H, K, V)
    S = S0
    for j in range(c):
        starts[:, j] = S
        S = torch.addcmul(Sc[:, j], S, carry[:, j, ..., None])
    qe = qh * torch.exp(bh)
    o = torch.baddbmm((A @ vh).view(-1, Q, V), qe.view(-1, Q, K), starts.view(-1, K, V)).view(b, c, H, Q, V)
    S = S.clone() if c == 0 else S                                          # never the caller's S0 itself
    return (_by_time(o, L), S), (bh, Dm, A, ke, qe, carry, starts)


def _chunked_backward(inputs, saved, grads, options):
    """The gradients of ``_chunked_forward`` (q, k, v, log_alpha, S0), written out: the start
    states' recurrence runs backwards over the chunks; ``db`` collects every use of the
    cumulative decay and becomes d log_alpha by a reversed cumulative sum.  Through Dm, b gets
    ``q * dq_intra - k * dk_intra`` (sum_s of d(Dm) Dm is q_t times dq's intra-chunk part, sum_t
    of it k_s times dk's), so nothing of size (Q, Q, dk) is formed beyond dA Dm."""
    q, k, v, _, _ = inputs
    bh, Dm, A, ke, qe, carry, starts = saved
    dO, dS = grads
    (Q,) = options
    L = q.shape[1]
    b, c, H, _, K = bh.shape
    pad = c * Q - L
    qh, kh, vh, dOh = (_by_chunk(t, pad, c, Q) for t in (q, k, v, dO))
    dqe = dOh @ starts.transpose(-1, -2)                                    # (B, c, H, Q, K)
    dstarts = qe.transpose(-1, -2) @ dOh                                    # (B, c, H, K, V)
    dSc, dcarry = torch.empty_like(starts), torch.empty_like(carry)
    g = dS
    for j in range(c - 1, -1, -1):
        dSc[:, j] = g
        dcarry[:, j] = (starts[:, j] * g).sum(-1)
        g = torch.addcmul(dstarts[:, j], g, carry[:, j, ..., None])
    dS0 = g.clone() if c == 0 else g
    dke = vh @ dSc.transpose(-1, -2)                                        # (B, c, H, Q, K)
    dvh = ke @ dSc + A.transpose(-1, -2) @ dOh
    upper = torch.ones(Q, Q, dtype=torch.bool, device=q.device).triu_(1)
    dA = (dOh @ vh.transpose(-1, -2)).masked_fill_(upper, 0.0)
    X = Dm * dA[..., None]                                                  # (B, c, H, Q, Q, K)
    dq_in = (X * kh[..., None, :, :]).sum(-2)
    dk_in = X.mul_(qh[..., :, None, :]).sum(-3)
    t = dke * ke
    db = qh * dq_in - kh * dk_in + dqe * qe - t
    db[..., -1, :] += t.sum(-2) + dcarry * carry
    dqh = dq_in.addcmul_(dqe, torch.exp(bh))
    dkh = dk_in.addcmul_(dke, torch.exp(bh[..., -1:, :] - bh))
    dlh = db.flip(3).cumsum(3).flip(3)
    return _by_time(dqh, L), _by_time(dkh, L), _by_time(dvh, L), _by_time(dlh, L), dS0

def _chunked_fake(q, k, v, log_alpha, S0, chunk):
    b, L, H, K = q.shape
    V, Q = v.shape[-1], chunk
    c = (L + Q - 1) // Q
    shapes = ((b, L, H, V), (b, H, K, V), (b, c, H, Q, K), (b, c, H, Q, Q, K), (b, c, H, Q, Q), (b, c, H, Q, K),
              (b, c, H, Q, K), (b, c, H, K), (b, c, H, K, V))
    return [q.new_empty(s) for s in shapes]


_CHUNKED = FusedCore("gla_chunked", "Tensor q, Tensor k, Tensor v, Tensor log_alpha, Tensor S0, int chunk",
                     _chunked_forward, _chunked_backward, _chunked_fake, n_outputs=2)


def gla_chunked(q, k, v, log_alpha, S, chunk: int = CHUNK):
    """q, k, log_alpha (B, L, H, dk), v (B, L, H, dv), S (B, H, dk, dv) -> (o (B, L, H, dv), S):
    one differentiable core with a hand-written backward (``FusedCore``; under torch.compile a
    custom op, no graph break)."""
    return _CHUNKED(q, k, v, log_alpha, S, chunk)


def gla_recurrent(q, k, v, log_alpha, S):
    outs = []
    for t in range(q.shape[1]):
        S = torch.exp(log_alpha[:, t]).unsqueeze(-1) * S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    if not outs:                                    # an empty sequence: no output, the state unchanged
        return v.new_zeros(v.shape), S.clone()
    return torch.stack(outs, 1), S


def head_norm(o, norm: str, eps: float):
    """Each head's output o (B, L, H, dv) normalised over its dv values (group: zero mean, unit variance)."""
    if norm == "group":
        o = o - o.mean(-1, keepdim=True)
    if norm in ("group", "rms"):
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps)
    return o


class GLA(Recurrent):
    """Linear attention with a decayed matrix state; ``step`` is one recurrence step."""

    op = "gla"

    def _build(self, shapes):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if f"{name}.weight" not in shapes:
                continue
            out_f, in_f = shapes[f"{name}.weight"]
            self.add_module(name, nn.Linear(in_f, out_f, bias=False))
        if "gk_proj.0.weight" in shapes:
            rank, d = shapes["gk_proj.0.weight"]
            self.gk_proj = nn.Sequential(nn.Linear(d, rank, bias=False), nn.Linear(rank, shapes["gk_proj.1.bias"][0]))
        for p in self.parameters():
            nn.init.zeros_(p)
        self.plan = self.attrs["plan"]

    def state_dtype(self, dtype):
        return accumulator_dtype(dtype)

    def _project(self, x):
        batch, length, _ = x.shape
        heads = self.attrs["heads"]
        q, k, v = (F.linear(x, getattr(self, n).weight.to(x.dtype)).view(batch, length, heads, -1)
                   for n in ("q_proj", "k_proj", "v_proj"))
        q = q / math.sqrt(q.shape[-1])
        decay = self.attrs["decay"]
        if decay == "gated":
            g = F.linear(F.linear(x, self.gk_proj[0].weight.to(x.dtype)), self.gk_proj[1].weight.to(x.dtype),
                         self.gk_proj[1].bias.to(x.dtype))
            log_alpha = F.logsigmoid(g).view(k.shape) / self.attrs["gate_normalizer"]
        elif decay == "fixed":
            gamma = torch.as_tensor(retnet_log_gamma(heads), dtype=x.dtype, device=x.device)
            log_alpha = gamma[:, None].expand(k.shape)
        else:
            log_alpha = torch.zeros_like(k)
        return q, k, v, log_alpha

    def forward(self, x, state=None, return_state=False, lengths=None):
        lengths = check_lengths(lengths, x)
        batch, length, _ = x.shape
        work, out_dtype = work_dtype(x, self.q_proj.weight), x.dtype
        acc = accumulator_dtype(work)
        with no_autocast(x):
            x = x.to(work)
            q, k, v, log_alpha = (t.to(acc) for t in self._project(x))
            if lengths is not None:
                keep = (torch.arange(length, device=x.device)[None, :] < lengths[:, None])[..., None, None]
                k, log_alpha = k * keep, log_alpha * keep
            S = (self.init_state(batch, work, x.device) if state is None else state)["S"].to(acc)
            if self.plan == "recurrent":
                o, S = eager_when_compiled(gla_recurrent, q, k, v, log_alpha, S)
            else:
                o, S = gla_chunked(q, k, v, log_alpha, S)
            y = head_norm(o, self.attrs["norm"], self.attrs["norm_eps"]).reshape(batch, length, -1).to(work)
            if self.attrs["o_proj"]:
                y = F.linear(y, self.o_proj.weight.to(work))
        y = y.to(output_dtype(out_dtype, work))
        return (y, {"S": S}) if return_state else y
