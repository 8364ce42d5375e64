"""RetNet (std/retnet_block.seq: gla with decay = fixed, norm = group, o_proj = false, a swish gate
and out_proj) against the RetNet paper's recurrent formulation written out here in NumPy (Sun et al.
2023, eqs. (6) and (8)-(9): S_n = gamma S_{n-1} + K_n^T V_n, Retention(X_n) = Q_n S_n per head with
gamma_h = 1 - 2^(-5-h), GroupNorm per head, (swish(X W_G) * Y) W_O; the layer Y = MSR(LN(X)) + X,
X' = FFN(LN(Y)) + Y, FFN = gelu(X W_1) W_2), in float64 to 1e-10 for the chunked and recurrent
plans, the numpy backend and step(); and the gla op's norm / o_proj options on their own."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import seqc
from conftest import assert_agree
from seqc.backends.numpy import ops as np_ops

SPEC = """include "std/retnet_block.seq"
model RetNet(d_model = 8, heads = 2, n_layers = 2, vocab = 13) {
  input tokens: [B, L] int
  embeddings = embedding(tokens, vocab = vocab, dim = d_model)
  x = repeat(n_layers) RetNetLayer(embeddings, d_model = d_model, heads = heads, key_dim = 6, d_ff = 12) as layers
  norm = layernorm(x)
  lm_head = linear(norm, vocab, bias = false)
  return lm_head
}
"""
EPS = 1e-5
_erf = np.vectorize(math.erf)


def _layernorm(x, w, b):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + EPS) * w + b


def _retention_recurrent(x, Wq, Wk, Wv, heads):
    """Per sequence, head and step: S_n = gamma_h S_{n-1} + K_n^T V_n, o_n = Q_n S_n, then
    each head's o_n group-normalised (mean 0, variance 1 over its values, no affine)."""
    batch, length, _ = x.shape
    dk, dv = Wq.shape[0] // heads, Wv.shape[0] // heads
    out = np.zeros((batch, length, heads * dv))
    for h in range(heads):
        gamma = 1 - 2.0 ** (-5 - h)
        rows_k, rows_v = slice(h * dk, (h + 1) * dk), slice(h * dv, (h + 1) * dv)
        for b in range(batch):
            S = np.zeros((dk, dv))
            for n in range(length):
                Q, K, V = Wq[rows_k] @ x[b, n], Wk[rows_k] @ x[b, n] / math.sqrt(dk), Wv[rows_v] @ x[b, n]
                S = gamma * S + np.outer(K, V)
                o = Q @ S
                out[b, n, rows_v] = (o - o.mean()) / math.sqrt(o.var() + EPS)
    return out


def _retnet(tokens, w, n_layers=2, heads=2):
    x = w["embeddings.weight"][tokens]
    for i in range(n_layers):
        p = {k[len(f"layers.{i}."):]: v for k, v in w.items() if k.startswith(f"layers.{i}.")}
        ln = _layernorm(x, p["retention_layer_norm.weight"], p["retention_layer_norm.bias"])
        Y = _retention_recurrent(ln, p["msr.retention.q_proj.weight"], p["msr.retention.k_proj.weight"],
                                 p["msr.retention.v_proj.weight"], heads)
        g = ln @ p["msr.g_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * Y) @ p["msr.out_proj.weight"].T
        ln = _layernorm(x, p["final_layer_norm.weight"], p["final_layer_norm.bias"])
        f = ln @ p["fc1.weight"].T + p["fc1.bias"]
        x = x + (0.5 * f * (1 + _erf(f / math.sqrt(2)))) @ p["fc2.weight"].T + p["fc2.bias"]
    return _layernorm(x, w["norm.weight"], w["norm.bias"]) @ w["lm_head.weight"].T


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    shapes = seqc.build_graph(SPEC).weight_shapes()
    return {k: rng.normal(1.0 if k.endswith("norm.weight") else 0.0, 0.4, tuple(int(d) for d in s))
            for k, s in shapes.items()}


@pytest.mark.parametrize("mode", ["scan", "recurrent"])
def test_retnet_matches_the_papers_recurrent_form(weights, mode):
    tokens = np.random.default_rng(1).integers(0, 13, (2, 41))       # chunks of 32 (torch), 8 (numpy), ragged
    want = _retnet(tokens, weights)
    m = seqc.compile(SPEC, mode=mode).double().load_numpy(weights).eval()
    assert {m.get_submodule(f"layers.{i}.msr.retention").plan for i in range(2)} == {mode}
    t = torch.as_tensor(tokens)
    with torch.no_grad():
        y = m(t)
        assert_agree(want, y, 1e-10, f"torch {mode}")
        # step by step from a fresh state, and a prefix then steps
        state, ys = m.init_state(2), []
        for i in range(tokens.shape[1]):
            y_t, state = m.step(t[:, i], state)
            ys.append(y_t)
        assert_agree(want, torch.stack(ys, 1), 1e-10, "step")
        _, state = m(t[:, :20], return_state=True)
        y_t, _ = m.step(t[:, 20], state)
        assert_agree(want[:, 20], y_t, 1e-10, "prefix then step")
    f = seqc.compile(SPEC, backend="numpy", mode=mode)
    assert_agree(want, f(tokens, weights), 1e-10, f"numpy {mode}")


@pytest.mark.parametrize("norm", ["group", "rms"])
@pytest.mark.parametrize("plan", ["scan", "recurrent"])
def test_gla_norm_and_no_o_proj_options(norm, plan):
    """norm normalises each head's output on its own; o_proj = false returns the heads' concatenation."""
    from seqc.backends.torch.base import LAYERS
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 19, 6))
    p = {f"{n}_proj.weight": rng.normal(0, 0.5, (4 if n in "qk" else 8, 6)) for n in "qkv"}
    attrs = dict(heads=2, key_dim=4, value_dim=8, decay="none", norm=norm, norm_eps=1e-3, o_proj=False, plan=plan)
    raw, _ = np_ops.gla(x, p=p, **{**attrs, "norm": "none"})
    raw = raw.reshape(2, 19, 2, 4)
    center = raw - raw.mean(-1, keepdims=True) if norm == "group" else raw
    want = (center / np.sqrt((center ** 2).mean(-1, keepdims=True) + 1e-3)).reshape(2, 19, 8)
    y, _ = np_ops.gla(x, p=p, **attrs)
    assert_agree(want, y, 1e-12, "numpy")
    layer = LAYERS["gla"]([6], attrs).double()
    assert set(dict(layer.named_parameters())) == {"q_proj.weight", "k_proj.weight", "v_proj.weight"}
    layer.load_state_dict({k: torch.as_tensor(v) for k, v in p.items()})
    assert_agree(want, layer(torch.as_tensor(x)), 1e-12, "torch")
    # with o_proj the projection follows the norm
    W = rng.normal(0, 0.5, (6, 8))
    y, _ = np_ops.gla(x, p={**p, "o_proj.weight": W}, **{**attrs, "o_proj": True})
    assert_agree(want @ W.T, y, 1e-12, "o_proj after the norm")


def test_shapes_and_difftest():
    src = "model M(d = 6) {\n  input x: [B, L, d]\n  r = gla(x, heads = 2, value_dim = 10, decay = fixed, o_proj = false)\n" \
          "  return r\n}\n"
    assert seqc.build_graph(src).weight_shapes() == {"r.q_proj.weight": (6, 6), "r.k_proj.weight": (6, 6),
                                                     "r.v_proj.weight": (10, 6)}
    assert tuple(seqc.compile(src)(torch.zeros(1, 3, 6)).shape) == (1, 3, 10)
    for mode in ("scan", "recurrent"):
        assert seqc.difftest(SPEC, modes=("auto", mode), length=37).ok


@pytest.mark.parametrize("plan", ["scan", "recurrent"])
def test_gradients_through_the_head_norm_match_finite_differences(plan):
    from seqc.backends.torch.base import LAYERS
    attrs = dict(heads=2, key_dim=4, value_dim=6, decay="fixed", norm="group", o_proj=False)
    layer = LAYERS["gla"]([5], attrs).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    layer.plan = plan
    x = torch.randn(2, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *w: torch.func.functional_call(
        layer, dict(zip([n for n, _ in layer.named_parameters()], w)), (x,)),
        (x, *[p.detach().clone().requires_grad_() for p in layer.parameters()]), eps=1e-6, atol=1e-7, fast_mode=True)
