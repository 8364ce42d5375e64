"""The gla op (seqc/ops/gla.py, backends/torch/ops/gla.py) against the papers' formulas written
out here - GLA's gated recurrence (Yang et al. 2024, alpha = sigmoid(.)^(1/16)), RetNet's parallel
retention (QK^T * D) V with D[n, m] = gamma^(n-m) (Sun et al. 2023), causal linear attention
sum_{s<=t} (q_t . k_s) v_s - in float64 to 1e-10; chunked (scan) == recurrent (values, gradients);
step vs forward; lengths=; float32; difftest."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import seqc
from conftest import assert_agree, example
from seqc.backends.numpy import ops as np_ops
from seqc.backends.torch.base import LAYERS


def _weights(rng, d=6, kd=4, vd=6, rank=3, gated=True):
    p = {"q_proj.weight": rng.normal(0, 0.5, (kd, d)), "k_proj.weight": rng.normal(0, 0.5, (kd, d)),
         "v_proj.weight": rng.normal(0, 0.5, (vd, d)), "o_proj.weight": rng.normal(0, 0.5, (d, vd))}
    if gated:
        p.update({"gk_proj.0.weight": rng.normal(0, 0.5, (rank, d)), "gk_proj.1.weight": rng.normal(0, 0.5, (kd, rank)),
                  "gk_proj.1.bias": rng.normal(0, 2.0, kd)})
    return p


def _heads(x, w, heads):
    y = x @ w.T
    return y.reshape(y.shape[:-1] + (heads, -1))


def _gla_paper(x, p, heads):
    """GLA, Yang et al. 2024, eq. for the recurrent form, per sequence and head:
    alpha_t = sigmoid(x_t W_a1 W_a2 + b)^(1/16); S_t = (alpha_t^T 1) * S_{t-1} + k_t^T v_t; o_t = q_t S_t."""
    q, k, v = (_heads(x, p[f"{n}_proj.weight"], heads) for n in "qkv")
    q = q / np.sqrt(q.shape[-1])
    alpha = (1 / (1 + np.exp(-((x @ p["gk_proj.0.weight"].T) @ p["gk_proj.1.weight"].T + p["gk_proj.1.bias"]))))
    alpha = (alpha ** (1 / 16)).reshape(k.shape)
    o = np.zeros(q.shape[:3] + (v.shape[-1],))
    for b in range(x.shape[0]):
        for h in range(heads):
            S = np.zeros((k.shape[-1], v.shape[-1]))
            for t in range(x.shape[1]):
                G = np.outer(alpha[b, t, h], np.ones(v.shape[-1]))
                S = G * S + np.outer(k[b, t, h], v[b, t, h])
                o[b, t, h] = q[b, t, h] @ S
    return o.reshape(x.shape[:2] + (-1,)) @ p["o_proj.weight"].T


def _retention_parallel(x, p, heads, gammas):
    """RetNet's parallel form per head: (Q K^T * D) V, D[n, m] = gamma^(n - m) for n >= m, else 0."""
    q, k, v = (_heads(x, p[f"{n}_proj.weight"], heads) for n in "qkv")
    q = q / np.sqrt(q.shape[-1])
    L = x.shape[1]
    n, m = np.arange(L)[:, None], np.arange(L)[None, :]
    o = np.zeros(q.shape[:3] + (v.shape[-1],))
    for h in range(heads):
        D = np.where(n >= m, gammas[h] ** (n - m).clip(min=0), 0.0)
        o[:, :, h] = (np.einsum("bnk,bmk->bnm", q[:, :, h], k[:, :, h]) * D) @ v[:, :, h]
    return o.reshape(x.shape[:2] + (-1,)) @ p["o_proj.weight"].T


def _linear_attention(x, p, heads):
    """Causal linear attention (identity feature map, no normaliser): o_t = sum_{s<=t} (q_t . k_s) v_s."""
    return _retention_parallel(x, p, heads, np.ones(heads))


@pytest.mark.parametrize("plan", ["recurrent", "scan"])
def test_reference_matches_the_papers(rng, plan):
    x = rng.standard_normal((2, 19, 6))
    attrs = dict(heads=2, key_dim=4, value_dim=6, gate_rank=3, plan=plan)
    p = _weights(rng)
    y, _ = np_ops.gla(x, p=p, decay="gated", **attrs)
    np.testing.assert_allclose(y, _gla_paper(x, p, 2), rtol=1e-10, atol=1e-10)
    p = _weights(rng, gated=False)
    gammas = 1 - 2.0 ** (-5 - np.arange(2))                       # RetNet: gamma_h = 1 - 2^(-5-h)
    y, _ = np_ops.gla(x, p=p, decay="fixed", **attrs)
    np.testing.assert_allclose(y, _retention_parallel(x, p, 2, gammas), rtol=1e-10, atol=1e-10)
    y, _ = np_ops.gla(x, p=p, decay="none", **attrs)
    np.testing.assert_allclose(y, _linear_attention(x, p, 2), rtol=1e-10, atol=1e-10)


def _layer(rng, decay, plan, **kw):
    attrs = dict(heads=2, key_dim=4, value_dim=6, gate_rank=3, decay=decay, **kw)
    layer = LAYERS["gla"]([6], attrs).double()
    p = _weights(rng, gated=decay == "gated")
    layer.load_state_dict({k: torch.as_tensor(v) for k, v in p.items()})     # strict: the same names
    layer.plan = plan
    return layer, p, attrs


@pytest.mark.parametrize("decay", ["gated", "fixed", "none"])
def test_torch_plans_match_the_papers_and_each_other_with_gradients(rng, decay):
    layer, p, attrs = _layer(rng, decay, "scan")
    x = rng.standard_normal((2, 45, 6))                          # 45: two full chunks and a ragged one
    want = {"gated": lambda: _gla_paper(x, p, 2),
            "fixed": lambda: _retention_parallel(x, p, 2, 1 - 2.0 ** (-5 - np.arange(2))),
            "none": lambda: _linear_attention(x, p, 2)}[decay]()
    grads, w = [], None
    for plan in ("scan", "recurrent"):
        layer.plan = plan
        xt = torch.as_tensor(x).requires_grad_(True)
        y, s = layer(xt, return_state=True)
        assert_agree(want, y, 1e-10, plan)
        w = torch.as_tensor(rng.standard_normal(y.shape)) if w is None else w
        grads.append(torch.autograd.grad((y * w).sum() + s["S"].sum(), [xt, *layer.parameters()]))
    for a, b in zip(*grads):
        assert_agree(a, b, 1e-10, "gradient scan vs recurrent")


def test_state_step_streaming_and_numpy_agree(rng):
    layer, p, attrs = _layer(rng, "gated", "scan")
    x = torch.as_tensor(rng.standard_normal((2, 11, 6)))
    y, final = layer(x, return_state=True)
    state, ys = layer.init_state(2, torch.float64), []
    for t in range(11):
        y_t, state = layer.step(x[:, t], state=state)
        ys.append(y_t)
    assert_agree(y, torch.stack(ys, 1), 1e-12, "step vs forward")
    assert_agree(final["S"], state["S"], 1e-12, "final state")
    y1, s = layer(x[:, :5], return_state=True)
    assert_agree(y[:, 5:], layer(x[:, 5:], state=s), 1e-12, "streaming")
    y_np, s_np = np_ops.gla(x.numpy(), p=p, **attrs)
    assert_agree(y, y_np, 1e-12, "numpy")
    assert_agree(final["S"], s_np["S"], 1e-12, "numpy state")


def test_lengths(rng):
    layer, _, _ = _layer(rng, "gated", "scan")
    x = torch.as_tensor(rng.standard_normal((3, 40, 6)))
    s0 = {"S": torch.as_tensor(rng.standard_normal((3, 2, 2, 3)))}
    lengths = torch.tensor([40, 0, 35])
    for plan in ("scan", "recurrent"):
        layer.plan = plan
        y, st = layer(x, state=s0, return_state=True, lengths=lengths)
        for b, n in enumerate(lengths.tolist()):
            one = {"S": s0["S"][b:b + 1]}
            if n:
                alone, s = layer(x[b:b + 1, :n], state=one, return_state=True)
                assert_agree(alone[0], y[b, :n], 1e-12, f"row {b}")
            else:
                s = one
            assert_agree(s["S"][0], st["S"][b], 1e-12, f"state {b}")


def test_float32_and_difftest(rng):
    for mode in ("scan", "recurrent"):
        assert seqc.difftest(example("gla.seq"), modes=("auto", mode), length=37).ok
    r = seqc.difftest(example("gla.seq"), backends=("torch", "torch"), modes=("scan", "recurrent"), length=37)
    assert r.ok and r.grad_abs is not None and r.grad_abs < 1e-10, str(r)
    m64 = seqc.compile(example("gla.seq")).double()
    m32 = seqc.compile(example("gla.seq"))
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    x = torch.as_tensor(rng.standard_normal((2, 70, 16)))
    x64, x32 = x.clone().requires_grad_(True), x.float().requires_grad_(True)
    y64, y32 = m64(x64), m32(x32)
    assert_agree(y64, y32, 1e-5, "float32 forward")
    y64.square().sum().backward()
    y32.square().sum().backward()
    assert_agree(x64.grad, x32.grad, 5e-5, "float32 gradient")


def test_bad_head_split_is_a_located_error():
    with pytest.raises(seqc.SeqcError, match="key_dim") as err:
        seqc.build_graph("model M() {\n input x: [B, L, 8]\n a = gla(x, heads = 3, key_dim = 8)\n return a\n}")
    assert err.value.line == 3


@pytest.mark.skipif("dtype" not in inspect.signature(seqc.difftest).parameters,
                    reason="this seqc.difftest has no dtype= (it arrives with the issue-8 merge)")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_difftest_numpy_vs_torch_per_dtype_with_gradients(dtype):
    report = seqc.difftest(example("gla.seq"), dtype=dtype)
    assert report.ok and report.grad_abs is not None, str(report)


@pytest.mark.parametrize("length,chunk", [(45, 16), (7, 4), (32, 8), (3, 8), (0, 4)])
def test_chunked_core_gradients_against_autograd_of_the_recurrence(length, chunk):
    """The chunked core's hand-written backward (all five inputs, the initial state included;
    ragged, shorter-than-a-chunk and empty lengths) against autograd through the step-by-step
    recurrence, and torch's gradcheck (finite differences) on the core itself."""
    from seqc.backends.torch.ops.gla import gla_chunked, gla_recurrent
    gen = torch.Generator().manual_seed(length)
    b, H, K, V = 2, 2, 3, 4
    q, k = (torch.randn(b, length, H, K, generator=gen, dtype=torch.float64) for _ in "qk")
    v = torch.randn(b, length, H, V, generator=gen, dtype=torch.float64)
    log_alpha = -2 * torch.rand(b, length, H, K, generator=gen, dtype=torch.float64)
    S0 = torch.randn(b, H, K, V, generator=gen, dtype=torch.float64)
    inputs = [t.requires_grad_(True) for t in (q, k, v, log_alpha, S0)]
    (o, S), (o_ref, S_ref) = gla_chunked(*inputs, chunk=chunk), gla_recurrent(*inputs)
    assert_agree(o_ref, o, 1e-12, "output")
    assert_agree(S_ref, S, 1e-12, "state")
    wo, ws = torch.randn(o.shape, generator=gen, dtype=torch.float64), torch.randn(S.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((o * wo).sum() + (S * ws).sum(), inputs)
    want = torch.autograd.grad((o_ref * wo).sum() + (S_ref * ws).sum(), inputs, allow_unused=True,
                               materialize_grads=True)      # (length 0: q, k, v unused, zero gradients)
    for name, g, w in zip(("q", "k", "v", "log_alpha", "S0"), got, want):
        assert_agree(w, g, 1e-12, f"d{name}")
    if length <= 8:
        assert torch.autograd.gradcheck(lambda *a: gla_chunked(*a, chunk=chunk), inputs)


def test_chunked_core_as_a_custom_op_passes_opcheck():
    """The custom op torch.compile traces (schema, fake shapes and strides, autograd
    registration) checked by torch.library.opcheck, its values and gradients equal to the eager core."""
    from seqc.backends.torch.ops import gla as gla_ops
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 11, 2, 3, generator=gen, dtype=torch.float64), torch.randn(2, 11, 2, 3, generator=gen, dtype=torch.float64),
            torch.randn(2, 11, 2, 4, generator=gen, dtype=torch.float64),
            -torch.rand(2, 11, 2, 3, generator=gen, dtype=torch.float64), torch.randn(2, 2, 3, 4, generator=gen, dtype=torch.float64)]
    args = [t.requires_grad_(True) for t in args]
    core = gla_ops._CHUNKED
    torch.library.opcheck(core._op, (*args, 4))
    out = core._op(*args, 4)[:2]
    ref = gla_ops.gla_chunked(*args, chunk=4)
    for a, r in zip(out, ref):
        assert_agree(r, a, 0, "custom op vs eager")
    g1 = torch.autograd.grad(out[0].sum() + out[1].sum(), args)
    g2 = torch.autograd.grad(ref[0].sum() + ref[1].sum(), args)
    for a, r in zip(g1, g2):
        assert_agree(r, a, 0, "custom op gradient vs eager")
