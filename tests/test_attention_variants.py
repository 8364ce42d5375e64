"""attention's variants (rotary embedding, grouped-query heads, head_dim, sliding
window, bidirectional) against an explicit per-query formula written here,
against transformers' LlamaAttention, and NumPy oracle vs torch (difftest, float32,
gradients); the KV cache under windows and streaming."""
import math

import numpy as np
import pytest
import torch

import seqc
import seqc.backends.numpy.ops as ops
from seqc import SeqcError
from seqc.backends.torch.layers import LAYERS
from seqc.init import init_layer
from seqc.registry import OPS

F64 = torch.float64

CONFIGS = {
    "plain": dict(heads=2),
    "gqa": dict(heads=4, kv_heads=2),
    "mqa-head_dim": dict(heads=3, kv_heads=1, head_dim=4, bias=True),
    "rope": dict(heads=2, rope=True, rope_theta=100.0),
    "rope-gqa-window": dict(heads=4, kv_heads=2, rope=True, window=3),
    "window1": dict(heads=2, window=1),
    "partial-rope-mqa-window-o_bias": dict(heads=4, kv_heads=1, rope=True, rope_dim=2, window=3, o_bias=True),
    "partial-rope-head_dim": dict(heads=2, head_dim=6, rope=True, rope_dim=4, rope_theta=50.0),
    "bidirectional": dict(heads=2, kv_heads=1, causal=False),
    "bidirectional-rope": dict(heads=2, rope=True, causal=False, bias=True),
}


def full(attrs):
    return {**OPS["attention"].defaults, **attrs}


def weights(d, attrs, seed=0):
    a = full(attrs)
    shapes = {k: tuple(int(n) for n in s) for k, s in OPS["attention"].weights(((1, 1, d),), a).items()}
    rng = np.random.default_rng(seed)
    return {k: w + 0.1 * rng.standard_normal(w.shape) for k, w in init_layer("attention", shapes, a, rng).items()}


def explicit(x, p, attrs, start=0):
    """Query by query: rotate (q, k) pairs (m, m + R/2) by pos * theta^(-2m/R) (R = rope_dim or
    head_dim; features from R on are not rotated), score the keys
    this query may see, softmax, mix the values of its key/value head."""
    a = full(attrs)
    B, L, d = x.shape
    H, KV = a["heads"], a["kv_heads"] or a["heads"]
    hd = a["head_dim"] or d // H
    lin = {n: x @ p[f"{n}.weight"].T + (p[f"{n}.bias"] if a["bias"] else 0) for n in ("q_proj", "k_proj", "v_proj")}
    q = lin["q_proj"].reshape(B, L, H, hd)
    k = lin["k_proj"].reshape(B, L, KV, hd)
    v = lin["v_proj"].reshape(B, L, KV, hd)

    def rot(vec, pos):
        if not a["rope"]:
            return vec
        out, R = vec.copy(), a["rope_dim"] or hd
        for m in range(R // 2):
            ang = pos * a["rope_theta"] ** (-2 * m / R)
            x1, x2 = vec[m], vec[m + R // 2]
            out[m], out[m + R // 2] = x1 * math.cos(ang) - x2 * math.sin(ang), x2 * math.cos(ang) + x1 * math.sin(ang)
        return out

    out = np.zeros((B, L, H, hd))
    for b in range(B):
        for h in range(H):
            g = h // (H // KV)
            for i in range(L):
                keys = [j for j in range(L) if not a["causal"] or (j <= i and (not a["window"] or j > i - a["window"]))]
                s = np.array([rot(q[b, i, h], start + i) @ rot(k[b, j, g], start + j) for j in keys]) / math.sqrt(hd)
                w = np.exp(s - s.max())
                out[b, i, h] = (w / w.sum()) @ v[b, keys, g]
    y = out.reshape(B, L, H * hd) @ p["o_proj.weight"].T
    return y + (p["o_proj.bias"] if a["bias"] or a["o_bias"] else 0)


def torch_layer(d, attrs, p, dtype=F64):
    m = LAYERS["attention"]([d], attrs).to(dtype)
    m.load_state_dict({k: torch.as_tensor(v, dtype=dtype) for k, v in p.items()})
    return m


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_oracle_and_torch_equal_the_explicit_formula(name):
    attrs, d = CONFIGS[name], 8
    x = np.random.default_rng(1).standard_normal((2, 7, d))
    p = weights(d, attrs)
    ref = explicit(x, p, attrs)
    y, _ = ops.attention(x, p=p, **attrs)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    m = torch_layer(d, attrs, p)
    np.testing.assert_allclose(m(torch.as_tensor(x)).detach().numpy(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in sorted(CONFIGS) if CONFIGS[n].get("causal", True)])
def test_steps_and_chunks_equal_forward_and_window_trims_the_cache(name):
    attrs, d = CONFIGS[name], 8
    x = torch.as_tensor(np.random.default_rng(2).standard_normal((2, 9, d)))
    m = torch_layer(d, attrs, weights(d, attrs))
    y, s = m(x, return_state=True)
    state, ys = m.init_state(2, F64), []
    for t in range(9):
        y_t, state = m.step(x[:, t], state=state)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-12, atol=1e-12)
    y1, s1 = m(x[:, :5], return_state=True)
    torch.testing.assert_close(torch.cat([y1, m(x[:, 5:], state=s1)], 1), y, rtol=1e-12, atol=1e-12)
    window = attrs.get("window", 0)
    assert s["k"].shape[2] == state["k"].shape[2] == (window - 1 if window else 9)
    if attrs.get("rope"):
        assert s["pos"].tolist() == [9.0, 9.0]
    # the numpy oracle's steps agree and its cache is trimmed the same way
    p = weights(d, attrs)
    s_np = ops.attention_init_state(2, p, **attrs)
    for t in range(9):
        y_t, s_np = ops.attention_step(x[:, t].numpy(), p=p, state=s_np, **attrs)
    np.testing.assert_allclose(y_t, y[:, -1].detach().numpy(), rtol=1e-12, atol=1e-12)
    assert s_np["k"].shape == tuple(state["k"].shape)


def test_rope_position_continues_from_the_cache():
    attrs, d = CONFIGS["rope-gqa-window"], 8
    x = np.random.default_rng(3).standard_normal((1, 6, d))
    p = weights(d, attrs)
    _, s = ops.attention(x[:, :4], p=p, **attrs)
    y, _ = ops.attention(x[:, 4:], p=p, state=s, **attrs)
    # the window (3) hides everything before position 2, so only positions 2.. matter
    np.testing.assert_allclose(y, explicit(x[:, 2:], p, attrs, start=2)[:, 2:], rtol=1e-12, atol=1e-12)
    # rotary scores depend on position differences only: a counter that forgot the cached positions
    # rotates the new tokens as if they came first, against keys cached at positions 2, 3
    wrong, _ = ops.attention(x[:, 4:], p=p, state={**s, "pos": np.zeros(1)}, **attrs)
    assert np.abs(wrong - y).max() > 1e-2


def test_bidirectional_has_no_step_and_says_so():
    src = """model M(d = 4) {
  input x: [B, L, d]
  attn = attention(x, heads = 2, causal = false)
  return attn
}"""
    m = seqc.compile(src)
    x = torch.randn(2, 5, 4)
    assert m(x).shape == (2, 5, 4)
    for call in (lambda: m.init_state(2), lambda: m(x, return_state=True),
                 lambda: m.get_submodule("attn").step(x[:, 0], state={})):
        with pytest.raises(SeqcError, match="bidirectional attention"):
            call()
    with pytest.raises(SeqcError, match="window needs causal"):
        seqc.compile(src.replace("causal = false", "causal = false, window = 2"))
    with pytest.raises(SeqcError, match="kv_heads"):
        seqc.compile(src.replace("causal = false", "kv_heads = 3"))


def test_bidirectional_lengths_equal_each_sequence_alone():
    attrs, d = CONFIGS["bidirectional-rope"], 8
    m = torch_layer(d, attrs, weights(d, attrs))
    x = torch.randn(3, 6, d, dtype=F64)
    y = m(x, lengths=torch.tensor([6, 2, 4]))
    for b, n in enumerate([6, 2, 4]):
        torch.testing.assert_close(y[b:b + 1, :n], m(x[b:b + 1, :n]), rtol=1e-12, atol=1e-12)


def _llama_attention(d, heads, kv_heads, head_dim, bias, theta):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
    cfg = LlamaConfig(hidden_size=d, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      attention_bias=bias, rope_theta=theta, attn_implementation="eager")
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    torch.manual_seed(0)
    attn = LlamaAttention(cfg, layer_idx=0).double()
    for prm in attn.parameters():
        torch.nn.init.normal_(prm, std=0.3)
    return attn, LlamaRotaryEmbedding(cfg)


@pytest.mark.parametrize("heads,kv_heads,head_dim,bias", [(4, 2, 4, False), (2, 1, 6, True), (4, 4, 2, False)])
def test_matches_transformers_llama_attention(heads, kv_heads, head_dim, bias):
    d, L, theta = 8, 7, 1000.0
    attn, rotary = _llama_attention(d, heads, kv_heads, head_dim, bias, theta)
    x = torch.randn(2, L, d, dtype=F64)
    pos = torch.arange(L)[None].expand(2, L)
    cos, sin = rotary(x, pos)
    mask = torch.full((L, L), -torch.inf, dtype=F64).triu(1)[None, None]
    ref, _ = attn(x, position_embeddings=(cos.double(), sin.double()), attention_mask=mask)
    attrs = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, bias=bias, rope=True, rope_theta=theta)
    m = LAYERS["attention"]([d], attrs).double()
    m.load_state_dict(attn.state_dict())
    # transformers computes the rotary angles in float32: agreement to float32 rounding of the angles
    torch.testing.assert_close(m(x), ref, rtol=1e-6, atol=1e-6)
    plain = LAYERS["attention"]([d], {**attrs, "rope": False}).double()
    plain.load_state_dict(attn.state_dict())
    assert (plain(x) - ref).abs().max() > 1e-2          # the rotation matters at this tolerance


SPEC = """model M(d = 8) {
  input x: [B, L, d]
  a = attention(x, heads = 4, kv_heads = 2, rope = true, rope_theta = 500.0, bias = true)
  w = attention(a, heads = 2, kv_heads = 1, head_dim = 6, rope = true, window = 4)
  b = attention(w, heads = 2, causal = false)
  return b
}"""


def test_difftest_numpy_vs_torch_float64_with_gradients():
    report = seqc.difftest(SPEC)
    assert report.ok, report


def test_float32_torch_matches_float64_oracle_and_gradients():
    ref = seqc.compile(SPEC, backend="numpy")
    m32 = seqc.compile(SPEC).load_numpy(ref.weights)
    m64 = seqc.compile(SPEC).double().load_numpy(ref.weights)
    x = np.random.default_rng(4).standard_normal((2, 11, 8))
    y = ref(x, ref.weights)
    x32 = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    x64 = torch.tensor(x, requires_grad=True)
    y32, y64 = m32(x32), m64(x64)
    np.testing.assert_allclose(y32.detach().numpy(), y, rtol=0, atol=2e-6 * np.abs(y).max())
    np.testing.assert_allclose(y64.detach().numpy(), y, rtol=1e-12, atol=1e-12)
    g = torch.randn(y64.shape, dtype=F64)
    (y32 * g.float()).sum().backward()
    (y64 * g).sum().backward()
    gx = x64.grad.numpy()
    np.testing.assert_allclose(x32.grad.numpy(), gx, rtol=0, atol=1e-5 * np.abs(gx).max())
    for (n, p32), (_, p64) in zip(m32.named_parameters(), m64.named_parameters()):
        np.testing.assert_allclose(p32.grad.numpy(), p64.grad.numpy(), rtol=0,
                                   atol=1e-5 * p64.grad.abs().max().item(), err_msg=n)


def test_llama_example_numpy_and_torch_agree_on_ragged_lengths_then_steps(rng):
    """Ragged prompts leave left-padded caches with per-row position counters in both backends;
    the next step must agree (and equal each sequence run alone)."""
    path = "examples/llama.seq"
    params = {"n_layers": 1, "d_model": 16, "n_heads": 4, "kv_heads": 2, "d_ff": 24}
    ref = seqc.compile(path, backend="numpy", params=params)
    tm = seqc.compile(path, params=params).double().load_numpy(ref.weights)
    tokens, lengths = rng.integers(0, 128, (3, 7)), np.array([7, 2, 5])
    y, s = ref(tokens, ref.weights, lengths=lengths, return_state=True)
    yt, st = tm(torch.as_tensor(tokens), lengths=torch.as_tensor(lengths), return_state=True)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(yt[b, :n].detach().numpy(), y[b, :n], rtol=1e-10, atol=1e-10)
    nxt = rng.integers(0, 128, (3,))
    y_np, _ = ref.step(nxt, state=s)
    y_t, _ = tm.step(torch.as_tensor(nxt), st)
    np.testing.assert_allclose(y_t.detach().numpy(), y_np, rtol=1e-10, atol=1e-10)
    for b, n in enumerate(lengths):
        alone = tm(torch.as_tensor(np.concatenate([tokens[b, :n], nxt[b:b + 1]]))[None])
        np.testing.assert_allclose(y_t[b].detach().numpy(), alone[0, -1].detach().numpy(), rtol=1e-10, atol=1e-10)


def test_difftest_llama_example():
    report = seqc.difftest("examples/llama.seq", params={"n_layers": 1})
    assert report.ok, report


@pytest.mark.parametrize("attrs, msg", [("rope_dim = 2", "rope_dim = 2 needs rope = true"),
                                        ("rope = true, rope_dim = 3", "rope_dim must be even"),
                                        ("rope = true, rope_dim = 6", "at most head_dim 4")])
def test_bad_rope_dim_is_a_located_error(attrs, msg):
    src = f"model M(d = 8) {{\n  input x: [B, L, d]\n  a = attention(x, heads = 2, {attrs})\n  return a\n}}\n"
    with pytest.raises(SeqcError, match=msg) as e:
        seqc.build_graph(src)
    assert e.value.span is not None and e.value.span.line == 3


def test_rope_tables_custom_op_matches_the_formula_and_passes_opcheck():
    """The rotary tables torch.compile sees as one opaque op (so inductor does not fuse the
    float64 cos/sin into every element of q and k): torch.library.opcheck (schema, fake shapes),
    and the values against theta^(-2i/width) angles written out here, offset positions included."""
    from seqc.backends.torch.ops import attention as att
    positions = torch.tensor([[0.0, 1.0, 2.0], [5.0, 6.0, 7.0]])
    theta, width = 500.0, 6
    torch.library.opcheck(att._rope_tables_op, (positions, theta, width, torch.float32))
    cos, sin = att._rope_tables_op(positions, theta, width, torch.float64)
    i = np.arange(width // 2)
    angles = positions.numpy()[..., None] * theta ** (-2.0 * i / width)
    want = np.concatenate([angles, angles], -1)[:, None]
    np.testing.assert_allclose(cos.numpy(), np.cos(want), rtol=0, atol=1e-15)
    np.testing.assert_allclose(sin.numpy(), np.sin(want), rtol=0, atol=1e-15)
    eager = att.rope_tables(positions, theta, width, torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(eager, (cos, sin)))
