"""gla as a torch layer: gated linear attention (GLA), RetNet's fixed decay or plain
causal linear attention (``decay``) with a matrix state ``S (B, heads, dk, dv)``.

Plans: ``scan`` (chunked) - chunks of ``CHUNK`` steps; within a chunk the output is a
masked score matrix ``A[t, s] = sum_k q_tk k_sk exp(b_tk - b_sk)`` (b the
cumulative log decay, every exponent <= 0) times v, plus ``(q_t exp(b_t)) S``
from the state carried between chunks; ``recurrent`` - the recurrence one step
at a time.  Both loop over the length in Python, so under torch.compile they run
eagerly in an intended graph break (``eager_when_compiled``): one graph for every
length.  ``norm`` (group / rms) normalises each head's output before ``o_proj``
(absent with ``o_proj = false``).  ``lengths=``: past a sequence's end k = 0 and alpha = 1, so the
final state is the state after exactly that many steps.  The state accumulates
in float32 (float64 for float64 inputs)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqc.ops.gla import retnet_log_gamma

from ..base import (Recurrent, accumulator_dtype, check_lengths, eager_when_compiled, no_autocast, output_dtype,
                    work_dtype)

CHUNK = 32


def gla_chunked(q, k, v, log_alpha, S, chunk: int = CHUNK):
    """q, k, log_alpha (B, L, H, dk), v (B, L, H, dv), S (B, H, dk, dv) -> (o (B, L, H, dv), S)."""
    outs = []
    for start in range(0, q.shape[1], chunk):
        qc, kc, vc = (t[:, start:start + chunk] for t in (q, k, v))
        b = log_alpha[:, start:start + chunk].cumsum(1)
        T = qc.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril().view(1, T, T, 1, 1)
        diff = b.unsqueeze(2) - b.unsqueeze(1)                                   # (B, t, s, H, dk)
        decay = torch.exp(torch.where(mask, diff, torch.full((), -torch.inf, dtype=b.dtype, device=b.device)))
        scores = torch.einsum("bthk,bshk,btshk->bhts", qc, kc, decay)
        o = torch.einsum("bhts,bshv->bthv", scores, vc) + torch.einsum("bthk,bhkv->bthv", qc * torch.exp(b), S)
        last = b[:, -1:]
        S = torch.exp(last[:, 0]).unsqueeze(-1) * S + torch.einsum("bshk,bshv->bhkv", kc * torch.exp(last - b), vc)
        outs.append(o)
    return torch.cat(outs, 1), S


def gla_recurrent(q, k, v, log_alpha, S):
    outs = []
    for t in range(q.shape[1]):
        S = torch.exp(log_alpha[:, t]).unsqueeze(-1) * S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
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
            core = gla_recurrent if self.plan == "recurrent" else gla_chunked
            o, S = eager_when_compiled(core, q, k, v, log_alpha, S)
            y = head_norm(o, self.attrs["norm"], self.attrs["norm_eps"]).reshape(batch, length, -1).to(work)
            if self.attrs["o_proj"]:
                y = F.linear(y, self.o_proj.weight.to(work))
        y = y.to(output_dtype(out_dtype, work))
        return (y, {"S": S}) if return_state else y
