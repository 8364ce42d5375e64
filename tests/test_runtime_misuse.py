"""Runtime misuse of a compiled torch model: each mistake is a SeqcError naming the
input / state entry and the fix, raised before any layer runs (not an IndexError inside
the embedding, a device-side assert on a GPU, or a state silently ignored)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import seqc
from seqc import SeqcError

SPEC = """model T(vocab = 10, d = 8) {
  input t: [B, L] int
  x = embedding(t, vocab = vocab, dim = d)
  y = lstm(x, hidden = d)
  return y
}"""

FLOAT_SPEC = """model F(d = 4) {
  input x: [B, L, d]
  y = lstm(x, hidden = d)
  return y
}"""


@pytest.fixture(scope="module")
def tok():
    return seqc.compile(source=SPEC)


@pytest.fixture(scope="module")
def flt():
    return seqc.compile(source=FLOAT_SPEC)


@pytest.mark.parametrize("ids, bad", [([[1, 10]], "10"), ([[-1, 2]], "-1"), ([[3, 2**40]], str(2**40))])
def test_token_ids_outside_the_vocabulary(tok, ids, bad):
    with pytest.raises(SeqcError, match=rf"input 't' holds token id {bad}, outside the vocabulary \[0, 10\)"):
        tok(torch.tensor(ids))
    with pytest.raises(SeqcError, match="outside the vocabulary"):
        tok.step(torch.tensor(ids)[:, 0 if bad == "-1" else 1])


def test_edge_tokens_and_empty_sequences_are_accepted(tok):
    assert tok(torch.tensor([[0, 9]])).shape == (1, 2, 8)
    assert tok(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, 8)


@pytest.mark.parametrize("x, msg", [(torch.tensor([[True, False]]), "holds booleans"),
                                    (torch.tensor([[1.0, 2.0]]), "takes integer tokens"),
                                    (np.array([[1, 2]]), "numpy.ndarray, not a torch tensor"),
                                    ([[1, 2]], "list, not a torch tensor")])
def test_wrong_kind_of_tokens(tok, x, msg):
    with pytest.raises(SeqcError, match=msg):
        tok(x)


def test_float64_input_to_a_float32_model_is_refused_with_the_fix(flt):
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(SeqcError, match=r"input 'x' is torch.float64 but the model computes in torch.float32"):
        flt(x)
    ref = flt.double()(x)                            # the fix the message names works
    flt.float()
    assert torch.allclose(flt(x.float()), ref.float(), atol=1e-5)


def test_input_on_another_device(flt):
    x = torch.randn(2, 3, 4, device="meta")
    with pytest.raises(SeqcError, match=r"input 'x' is on meta but the model is on cpu"):
        flt(x)


@pytest.mark.parametrize("batch", [-1, 1.5, "2", True, None])
def test_init_state_batch(tok, batch):
    with pytest.raises(SeqcError, match=r"init_state\(batch\): batch must be a non-negative int"):
        tok.init_state(batch)


def test_init_state_accepts_ints_and_zero(tok):
    assert tok.init_state(0)["y"]["h"].shape[0] == 0
    assert tok.init_state(torch.tensor(2))["y"]["h"].shape[0] == 2


def test_states_of_the_wrong_batch_shape_or_keys(tok):
    x = torch.tensor([[1, 2], [3, 4]])
    good = tok.init_state(2)
    out, s = tok(x, state=good, return_state=True)
    with pytest.raises(SeqcError, match=r"state\['y'\]\['h'\] has shape \(3, 1, 8\), expected \(2, 1, 8\)"):
        tok(x, state=tok.init_state(3))
    with pytest.raises(SeqcError, match=r"state\['y'\]\['h'\] has shape"):
        tok.step(x[:, 0], state=tok.init_state(3))
    with pytest.raises(SeqcError, match=r"unknown keys \['zzz'\], missing keys \['y'\]"):
        tok(x, state={"zzz": good["y"]})
    with pytest.raises(SeqcError, match=r"unknown keys \['extra'\]"):
        tok(x, state={**s, "extra": 1})
    with pytest.raises(SeqcError, match=r"missing keys \['c'\]"):
        tok(x, state={"y": {"h": good["y"]["h"]}})
    bad = {"y": {"h": good["y"]["h"][..., :4], "c": good["y"]["c"]}}
    with pytest.raises(SeqcError, match=r"state\['y'\]\['h'\] has shape \(2, 1, 4\), expected \(2, 1, 8\)"):
        tok(x, state=bad)
    with pytest.raises(SeqcError, match="state must be the dict"):
        tok(x, state=[good])
    # a correct state continues the sequence exactly as one long call does
    whole = tok(torch.cat([x, x], 1))
    second = tok(x, state=s)
    assert torch.allclose(second, whole[:, 2:], atol=1e-6)


def test_a_growing_key_value_cache_is_a_valid_state_but_its_batch_is_checked():
    import os
    from conftest import ROOT
    m = seqc.compile(path=os.path.join(ROOT, "examples", "attention.seq"))
    d = m._inputs[0][1][-1]
    x = torch.randn(2, 3, int(d))
    _, s = m(x, return_state=True)
    y, _ = m.step(x[:, 0], state=s)                     # a cache of 3 positions is accepted
    with pytest.raises(SeqcError, match="has shape"):
        m.step(x[:1, 0], state=s)


def test_a_ragged_attention_state_keeps_its_optional_key_but_typos_are_refused():
    import os
    from conftest import ROOT
    m = seqc.compile(path=os.path.join(ROOT, "examples", "attention.seq"))
    x = torch.randn(2, 3, 64)
    _, s = m(x, lengths=torch.tensor([3, 1]), return_state=True)
    assert "valid" in s["attn"]
    m.step(x[:, 0], state=s)
    with pytest.raises(SeqcError, match=r"state\['attn'\] does not match the model's state: unknown keys \['vaild'\]"):
        m.step(x[:, 0], state={"attn": {**s["attn"], "vaild": s["attn"]["valid"]}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_out_of_vocabulary_on_a_gpu_is_an_error_not_a_device_side_assert(tok):
    m = seqc.compile(source=SPEC, device="cuda")
    with pytest.raises(SeqcError, match="token id 10, outside the vocabulary"):
        m(torch.tensor([[1, 10]], device="cuda"))
    assert m(torch.tensor([[1, 9]], device="cuda")).shape == (1, 2, 8)     # the CUDA context still works
    with pytest.raises(SeqcError, match="is on cpu but the model is on cuda"):
        m(torch.tensor([[1, 2]]))
