"""Regression tests for defects found in review: each states the behaviour a
user relies on, checked against the numpy oracle or a plain expectation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import seqc
from conftest import assert_agree, example

S4D = {"d_model": 2, "d_state": 4}


def test_conv_plan_survives_modes_that_underflow_to_zero():
    conv = seqc.compile(example("s4d.seq"), params=S4D, mode="conv").double()
    with torch.no_grad():
        conv.get_submodule("ssm").log_dt.copy_(torch.tensor([8.0, -3.0]))   # exp(dt A) underflows for h = 0
    rec = seqc.compile(example("s4d.seq"), params=S4D, mode="recurrent").double()
    rec.load_state_dict(conv.state_dict())
    x = torch.randn(1, 20, 2, dtype=torch.float64)
    (y, s), (y2, s2) = conv(x, return_state=True), rec(x, return_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(s["ssm"]["x"]).all()
    assert_agree(y2, y, 1e-10)
    assert_agree(s2["ssm"]["x"], s["ssm"]["x"], 1e-10)


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
def test_selective_discretizations_agree_with_the_oracle(disc):
    src = f"""model M() {{
  input u: [B, L, 8]
  s = selective_ssm(u, u, u, u, d_state = 8, disc = {disc})
  return s
}}"""
    report = seqc.difftest(src)
    assert report.ok, str(report)


def test_swapped_submodule_is_used():
    m = seqc.compile(example("mamba.seq"), params={"n_layers": 1})
    x = torch.randn(2, 5, 64)
    norm = m.get_submodule("layers.0.norm")
    expected = m(x)
    m.layers[0].norm = torch.nn.Identity()
    assert not torch.allclose(m(x), expected)
    m.layers[0].norm = norm
    assert torch.equal(m(x), expected)


def test_empty_chunk_leaves_state_unchanged():
    m = seqc.compile(example("hybrid.seq"), params={"n_layers": 1, "d_model": 16, "n_heads": 2}).double()
    tokens = torch.randint(0, 256, (2, 6))
    _, s = m(tokens[:, :4], return_state=True)
    y0, s0 = m(tokens[:, :0], state=s, return_state=True)
    assert y0.shape == (2, 0, 256)
    assert_agree(m(tokens[:, 4:], state=s), m(tokens[:, 4:], state=s0), 0.0)


def test_numpy_lengths_with_attention_caches_match_torch(rng):
    params = {"n_layers": 1, "d_model": 16, "n_heads": 2}
    ref = seqc.compile(example("hybrid.seq"), backend="numpy", params=params)
    tm = seqc.compile(example("hybrid.seq"), params=params).double().load_numpy(ref.weights)
    tokens, lengths = rng.integers(0, 256, (3, 8)), np.array([8, 3, 5])
    y, s = ref(tokens, ref.weights, lengths=lengths, return_state=True)
    yt, st = tm(torch.as_tensor(tokens), lengths=torch.as_tensor(lengths), return_state=True)
    for b, n in enumerate(lengths):
        assert_agree(y[b, :n], yt[b, :n], 1e-10)
    nxt = rng.integers(0, 256, (3,))
    assert_agree(ref.step(nxt, state=s)[0], tm.step(torch.as_tensor(nxt), st)[0], 1e-10)


def test_inputs_are_checked_and_symbols_bound_consistently(rng):
    src = """model M(d = 4) {
  input x: [B, L, d]
  input y: [B, L, d]
  return x + y
}"""
    tm, ref = seqc.compile(src), seqc.compile(src, backend="numpy")
    with pytest.raises(seqc.SeqcError, match=r"dimension 1 \(L\) is 1, but L = 5"):
        tm(torch.randn(2, 5, 4), torch.randn(2, 1, 4))
    with pytest.raises(seqc.SeqcError, match="dimension 2 must be 4"):
        ref(rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 3)), ref.weights)
    with pytest.raises(seqc.SeqcError, match="integer tokens"):
        seqc.compile(example("transformer.seq"), params={"n_layers": 1})(torch.randn(2, 3))


@pytest.mark.parametrize("src,message", [
    ("""block Blk() {
  input x: [B, L, 4]
  a = conv1d(x) as self
  b = ssm(a, kind = shift, d_state = 3) as self
  return b
}
model M() {
  input x: [B, L, 4]
  m = Blk(x)
  return m
}""", "already has an 'as self' layer"),
    ("""block Blk() {
  input x: [B, L, 4]
  y = silu(x) as self
  return y
}
model M() {
  input x: [B, L, 4]
  m = Blk(x)
  return m
}""", "has none"),
    ("""block Blk() {
  input x: [B, L, 4]
  q_proj = linear(x, 4)
  m = attention(q_proj, heads = 2) as self
  return m
}
model M() {
  input x: [B, L, 4]
  m = Blk(x)
  return m
}""", "already exists"),
    ("""model M() {
  input x: [B, L, 4]
  _hidden = linear(x, 4)
  return _hidden
}""", "reserved"),
    ("""model M() {
  input t: [B, L] int
  return t + t
}""", "float tensors"),
    ("""model M() {
  input x: [B, L, 4]
  input y: [B, L - 2 * L, 4]
  return x
}""", "positive integer"),
])
def test_more_located_errors(src, message):
    with pytest.raises(seqc.SeqcError, match=message) as e:
        seqc.build_graph(src)
    assert e.value.line is not None


def test_diamond_includes_and_keyword_model_names(tmp_path):
    (tmp_path / "b.seq").write_text('include "std/mamba_block.seq"\n')
    (tmp_path / "m.seq").write_text('include "std/mamba_block.seq"\ninclude "b.seq"\n'
                                    "model class(d = 16) {\n  input x: [B, L, d]\n"
                                    "  y = MambaBlock(x, d_model = d)\n  return y\n}\n")
    report = seqc.difftest(str(tmp_path / "m.seq"))
    assert report.ok


def test_multi_output_models_and_other_symbol_names():
    src = """model M(d = 4) {
  input x: [batch, time, d]
  a = linear(x, d)
  return a, silu(x)
}"""
    report = seqc.difftest(src)
    assert report.ok and [r.op for r in report.rows] == ["linear", "silu"]
    outs = seqc.compile(src)(torch.randn(2, 3, 4))
    assert isinstance(outs, tuple) and len(outs) == 2


def test_singular_discretization_is_a_user_error():
    with pytest.raises(seqc.SeqcError, match="singular"):
        seqc.discretize([2.0], [1.0], 1.0, "bilinear")


def test_lstm_rows_of_length_zero_keep_their_state(rng):
    ref = seqc.compile(example("lstm.seq"), backend="numpy", params={"layers": 2})
    tm = seqc.compile(example("lstm.seq"), params={"layers": 2}).double().load_numpy(ref.weights)
    x, lengths = rng.standard_normal((3, 6, 32)), np.array([6, 0, 2])
    y, s = ref(x, ref.weights, lengths=lengths, return_state=True)
    yt, st = tm(torch.as_tensor(x), lengths=torch.as_tensor(lengths), return_state=True)
    assert_agree(y, yt, 1e-10)
    for k in ("h", "c"):
        assert_agree(s["lstm"][k], st["lstm"][k], 1e-10)


def test_numpy_empty_chunk_matches_torch(rng):
    params = {"n_layers": 1, "d_model": 16, "n_heads": 2}
    ref = seqc.compile(example("hybrid.seq"), backend="numpy", params=params)
    tokens = rng.integers(0, 256, (2, 6))
    _, s = ref(tokens[:, :4], ref.weights, return_state=True)
    y0, s0 = ref(tokens[:, :0], ref.weights, state=s, return_state=True)
    assert y0.shape == (2, 0, 256)
    assert_agree(ref(tokens[:, 4:], ref.weights, state=s), ref(tokens[:, 4:], ref.weights, state=s0), 0.0)
