"""The rglru op (seqc/ops/rglru.py, backends/torch/ops/rglru.py) and the Griffin recurrent block
(seqc/stdlib/griffin_block.seq): against transformers' RecurrentGemmaRglru / RecurrentGemmaRecurrentBlock
(tiny random config, float64), against the paper's recurrence written here, plan against plan (values
and gradients), step against forward, lengths=, float32, and the initialiser."""
from __future__ import annotations

import functools
import inspect
import math

import numpy as np
import pytest
import torch

import seqc
from conftest import assert_agree, example
from seqc.backends.numpy import ops as np_ops
from seqc.backends.torch.base import LAYERS
from seqc.init import init_layer
from seqc.ops import OPS
from seqc.ops.rglru import gates as rglru_gates

transformers = pytest.importorskip("transformers")
from transformers.models.recurrent_gemma import modeling_recurrent_gemma as hf  # noqa: E402

BLOCK = """include "std/griffin_block.seq"
model G(d_model = 8, lru_width = 12, heads = 3, conv_width = 4) {
  input x: [B, L, d_model]
  temporal_block = GriffinRecurrent(x, d_model = d_model, lru_width = lru_width, heads = heads,
                                    conv_width = conv_width)
  return temporal_block
}"""


def _config(hidden=8, lru=12, heads=3, conv=4):
    """A tiny RecurrentGemma config (head_dim only matters to its attention blocks)."""
    return transformers.RecurrentGemmaConfig(hidden_size=hidden, lru_width=lru, num_attention_heads=heads,
                                             conv1d_width=conv, num_hidden_layers=1, vocab_size=16,
                                             intermediate_size=16, head_dim=4)


def _hf_block(seed=0):
    torch.manual_seed(seed)
    block = hf.RecurrentGemmaRecurrentBlock(_config(), 0).double()
    for p in block.parameters():           # random everything (transformers' init zeroes the biases)
        torch.nn.init.normal_(p, std=0.5)
    # transformers accumulates the scan in float32 whatever the dtype; its own float64 option:
    block.rg_lru._rnn_scan = functools.partial(type(block.rg_lru)._rnn_scan, block.rg_lru, acc_dtype=torch.float64)
    return block


def _paper_rglru(x, p, heads, c=8.0):
    """Griffin Sec. 2.4 written out per time step and per channel, with a = sigmoid(Lambda),
    Lambda = -recurrent_param, the gates block-diagonal (x_h @ W_h) per head; the first token
    of a sequence is a reset (RecurrentGemma: no normalisation, h = i * x)."""
    batch, length, d = x.shape
    w = d // heads
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))   # noqa: E731
    y = np.zeros_like(x)
    for b in range(batch):
        h = np.zeros(d)
        for t in range(length):
            for k in range(heads):
                s = slice(k * w, (k + 1) * w)
                r = sig(x[b, t, s] @ p["recurrent_gate_weight"][k] + p["recurrent_gate_bias"][k])
                i = sig(x[b, t, s] @ p["input_gate_weight"][k] + p["input_gate_bias"][k])
                a = sig(-p["recurrent_param"][s]) ** (c * r)
                if t == 0:
                    h[s] = i * x[b, t, s]
                else:
                    h[s] = a * h[s] + np.sqrt(1.0 - a ** 2) * (i * x[b, t, s])
            y[b, t] = h
    return y


def _params(rng, d=12, heads=3):
    w = d // heads
    return {"recurrent_param": rng.normal(0.0, 1.0, d),
            "input_gate_weight": rng.normal(0, 0.5, (heads, w, w)), "input_gate_bias": rng.normal(0, 0.5, (heads, w)),
            "recurrent_gate_weight": rng.normal(0, 0.5, (heads, w, w)),
            "recurrent_gate_bias": rng.normal(0, 0.5, (heads, w))}


@pytest.mark.parametrize("plan", ["recurrent", "scan"])
def test_reference_is_the_paper_recurrence(rng, plan):
    p = _params(rng)
    x = rng.standard_normal((2, 19, 12))
    y, state = np_ops.rglru(x, p=p, heads=3, plan=plan)
    want = _paper_rglru(x, p, 3)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state["h"], want[:, -1], rtol=1e-12, atol=1e-12)


def test_rglru_matches_transformers_rglru(rng):
    block = _hf_block(1)
    ours = LAYERS["rglru"]([12], {"heads": 3}).double()
    ours.load_state_dict(block.rg_lru.state_dict())           # transformers' names load unchanged
    x = torch.as_tensor(rng.standard_normal((2, 21, 12)))
    pos = torch.arange(21)[None].expand(2, -1)
    block.rg_lru.recurrent_states = None
    want = block.rg_lru(x, pos)
    for plan in ("scan", "recurrent"):
        ours.plan = plan
        assert_agree(want, ours(x), 1e-13, plan)
    p = {k: v.detach().numpy() for k, v in ours.state_dict().items()}
    assert_agree(want, np_ops.rglru(x.numpy(), p=p, heads=3)[0], 1e-13, "numpy")


@pytest.mark.parametrize("plan", ["scan", "recurrent"])
def test_griffin_block_matches_transformers_recurrent_block(rng, plan):
    block = _hf_block(2)
    model = seqc.compile(BLOCK, mode=plan).double()
    model.get_submodule("temporal_block").load_state_dict(block.state_dict())   # strict: same keys
    x = torch.as_tensor(rng.standard_normal((2, 13, 8)))
    pos = torch.arange(13)[None].expand(2, -1)
    want, _ = block(x, pos, None, use_cache=False)
    assert_agree(want, model(x), 1e-12, "forward")
    # gradients through the whole block, parameter by parameter (same names)
    xg = x.clone().requires_grad_(True)
    wgt = torch.randn_like(want)
    g_ref = torch.autograd.grad((block(xg, pos, None, use_cache=False)[0] * wgt).sum(), [xg, *block.parameters()])
    sub = model.get_submodule("temporal_block")
    ours = dict(sub.named_parameters())
    g = torch.autograd.grad((model(xg) * wgt).sum(), [xg] + [ours[n] for n, _ in block.named_parameters()])
    for (name, a), b in zip([("x", None)] + list(block.named_parameters()), zip(g_ref, g)):
        assert_agree(b[0], b[1], 1e-10, f"gradient {name}")
    # numpy backend on the same weights
    ref = seqc.compile(BLOCK, backend="numpy")
    w = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert_agree(want, ref(x.numpy(), w), 1e-12, "numpy")


def test_gradient_of_the_normaliser_is_clipped_like_transformers(rng):
    """Channels with a -> 1 (1 - a^2 below 2.5e-7): transformers clips d sqrt/dv at 1000."""
    block = _hf_block(4)
    with torch.no_grad():
        block.rg_lru.recurrent_param[:6] = -17.0          # softplus ~ 4e-8: 1 - a^2 ~ 1e-7 * r
    ours = LAYERS["rglru"]([12], {"heads": 3}).double()
    ours.load_state_dict(block.rg_lru.state_dict())
    x = torch.as_tensor(rng.standard_normal((2, 6, 12))).requires_grad_(True)
    block.rg_lru.recurrent_states = None
    y_ref = block.rg_lru(x, torch.arange(6)[None].expand(2, -1))
    w = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad((y_ref * w).sum(), [x, block.rg_lru.recurrent_param])
    g = torch.autograd.grad((ours(x) * w).sum(), [x, ours.recurrent_param])
    for a, b in zip(g_ref, g):
        assert_agree(a, b, 1e-10, "gradient near a = 1")


def test_step_and_streaming_equal_forward_like_transformers_decoding(rng):
    """Prefill + token-by-token decoding in transformers equals our init_state + step."""
    block = _hf_block(3)
    model = seqc.compile(BLOCK).double()
    model.get_submodule("temporal_block").load_state_dict(block.state_dict())
    x = torch.as_tensor(rng.standard_normal((2, 9, 8)))
    y = model(x)
    state, ys = model.init_state(2), []
    for t in range(9):
        y_t, state = model.step(x[:, t], state)
        ys.append(y_t)
    assert_agree(y, torch.stack(ys, 1), 1e-12, "step vs forward")
    # streaming: two chunks with the state handed over
    y1, s = model(x[:, :4], return_state=True)
    y2 = model(x[:, 4:], state=s)
    assert_agree(y, torch.cat([y1, y2], 1), 1e-12, "chunks vs forward")
    # transformers' own decoding path: prefill 4 tokens, then one token at a time
    block._setup_cache(2, x.device, x.dtype)
    block.rg_lru.recurrent_states = block.rg_lru.recurrent_states.double()
    out = [block(x[:, :4], torch.arange(4)[None].expand(2, -1), None, use_cache=True)[0]]
    for t in range(4, 9):
        out.append(block(x[:, t:t + 1], torch.full((2, 1), t), None, use_cache=True)[0])
    assert_agree(torch.cat(out, 1), y, 1e-12, "transformers decoding")


def test_lengths_and_numpy_step(rng):
    ours = LAYERS["rglru"]([12], {"heads": 3}).double()
    with torch.no_grad():
        for k, v in _params(rng).items():
            getattr(ours, k).copy_(torch.as_tensor(v))
    x = torch.as_tensor(rng.standard_normal((3, 7, 12)))
    lengths = torch.tensor([7, 0, 3])
    for plan in ("scan", "recurrent"):
        ours.plan = plan
        y, st = ours(x, return_state=True, lengths=lengths)
        for b, n in enumerate(lengths.tolist()):
            if n:
                alone, s = ours(x[b:b + 1, :n], return_state=True)
                assert_agree(alone[0], y[b, :n], 1e-13, f"row {b}")
                assert_agree(s["h"][0], st["h"][b], 1e-13, f"state {b}")
            assert float(st["started"][b, 0]) == float(n > 0)
    p = {k: v.detach().numpy() for k, v in ours.state_dict().items()}
    y, fin = np_ops.rglru(x.numpy(), p=p, heads=3)
    s, ys = np_ops.rglru_init_state(3, p, heads=3), []
    for t in range(7):
        y_t, s = np_ops.rglru_step(x.numpy()[:, t], p=p, state=s, heads=3)
        ys.append(y_t)
    assert_agree(y, np.stack(ys, 1), 1e-13, "numpy step")
    with pytest.raises(seqc.SeqcError, match="lengths"):
        ours(x, lengths=torch.tensor([8, 1, 1]))


def test_no_reset_is_the_plain_recurrence(rng):
    p = _params(rng)
    x = rng.standard_normal((1, 5, 12))
    y, state = np_ops.rglru(x, p=p, heads=3, reset=False)
    assert set(state) == {"h"}
    log_a, u = rglru_gates(x, p, 3, 8.0)
    h = np.zeros(12)
    for t in range(5):
        a = np.exp(log_a[0, t])
        h = a * h + np.sqrt(1 - a * a) * u[0, t]
    np.testing.assert_allclose(y[0, -1], h, rtol=1e-13)


def test_difftest_and_float32(rng):
    for mode in ("scan", "recurrent"):
        report = seqc.difftest(example("griffin.seq"), modes=("auto", mode))
        assert report.ok, str(report)
    r = seqc.difftest(example("griffin.seq"), backends=("torch", "torch"), modes=("scan", "recurrent"))
    assert r.ok and r.grad_abs is not None and r.grad_abs < 1e-10, str(r)
    m64 = seqc.compile(example("griffin.seq")).double()
    m32 = seqc.compile(example("griffin.seq"))
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    x = torch.as_tensor(rng.standard_normal((2, 40, 16)))
    x32 = x.float().requires_grad_(True)
    x64 = x.clone().requires_grad_(True)
    y64, y32 = m64(x64), m32(x32)
    assert_agree(y64, y32, 2e-5, "float32 forward")
    y64.square().sum().backward()
    y32.square().sum().backward()
    assert_agree(x64.grad, x32.grad, 5e-5, "float32 gradient")


def test_initialiser_follows_recurrent_gemma(rng):
    shapes = {k: tuple(v) for k, v in OPS["rglru"].weights([(1, 1, 4000)], {"heads": 4}).items()}
    w = init_layer("rglru", shapes, {"heads": 4}, np.random.default_rng(0))
    a2 = np.exp(-2 * np.log1p(np.exp(w["recurrent_param"])))          # a^2 with c r = 1
    assert a2.min() >= 0.9 ** 2 and a2.max() <= 0.999 ** 2 + 1e-8
    assert abs(w["input_gate_weight"].std() - math.sqrt(0.01 / 1000)) < 0.01 * math.sqrt(0.01 / 1000)
    assert not w["input_gate_bias"].any() and not w["recurrent_gate_bias"].any()


def test_heads_must_divide_the_width():
    with pytest.raises(seqc.SeqcError, match="heads"):
        seqc.build_graph("model M() {\n input x: [B, L, 10]\n r = rglru(x, heads = 3)\n return r\n}")


def test_gelu_tanh_is_torchs_tanh_approximation(rng):
    from seqc.backends.torch.base import FUNCTIONS
    x = rng.standard_normal(50) * 3
    want = torch.nn.functional.gelu(torch.as_tensor(x), approximate="tanh")
    assert_agree(want, np_ops.gelu_tanh(x), 1e-14, "numpy")
    assert_agree(want, FUNCTIONS["gelu_tanh"](torch.as_tensor(x)), 0.0, "torch")
    assert not np.allclose(np_ops.gelu_tanh(x), np_ops.gelu(x), atol=1e-4)   # not the exact GELU


@pytest.mark.skipif("dtype" not in inspect.signature(seqc.difftest).parameters,
                    reason="this seqc.difftest has no dtype= (it arrives with the issue-8 merge)")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_difftest_numpy_vs_torch_per_dtype_with_gradients(dtype):
    report = seqc.difftest(example("griffin.seq"), dtype=dtype)
    assert report.ok and report.grad_abs is not None, str(report)
