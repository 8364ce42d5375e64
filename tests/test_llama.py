"""Llama end to end: seqc/interop/families/llama.py + std/llama_block.seq against a tiny
randomly initialised transformers LlamaForCausalLM (logits in float64, greedy tokens from
its generate()), config settings honoured or refused by name, and seqc.generate's
sampling filters against hand-written references."""
import json

import numpy as np
import pytest
import torch

import seqc
from seqc.generate import filter_top_k, filter_top_p
from seqc.interop.families import family_for, llama

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=61, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0}, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)


def hf_model(tmp_path, **over):
    cfg = transformers.LlamaConfig(**{**BASE, **over})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.3)   # random norms too, logits spread out
    model.save_pretrained(tmp_path)
    return model.eval()


def load(path):
    """The steps from_pretrained takes: config.json -> family -> spec -> compile -> strict load."""
    from safetensors.torch import load_file
    config = json.loads((path / "config.json").read_text())
    family = family_for(config["model_type"])
    m = seqc.compile(family.spec_for_config(config))
    m.load_state_dict(family.convert_state_dict(load_file(path / "model.safetensors"), config), strict=True)
    return m.eval()


@pytest.mark.parametrize("over", [{}, dict(attention_bias=True, mlp_bias=True, head_dim=6, num_key_value_heads=1),
                                  dict(num_key_value_heads=4, hidden_act="silu")],
                         ids=["gqa", "bias-head_dim-mqa", "mha"])
def test_logits_match_transformers_float64(tmp_path, over):
    ref = hf_model(tmp_path, **over).double()
    m = load(tmp_path).double()
    tokens = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(1))
    expected = ref(tokens).logits
    got = m(tokens)
    # transformers computes the rotary angles in float32 even for a float64 model
    err = (got - expected).abs().max().item() / expected.abs().max().item()
    assert err < 1e-6, err
    # prefill + steps (the KV cache path) give the same logits
    logits, state = m(tokens[:, :5], return_state=True)
    for t in range(5, 9):
        y, state = m.step(tokens[:, t], state)
        torch.testing.assert_close(y, got[:, t], rtol=1e-10, atol=1e-10)


def test_float32_logits_within_1e_4(tmp_path):
    ref, m = hf_model(tmp_path), None
    m = load(tmp_path)
    tokens = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(2))
    expected = ref(tokens).logits
    assert ((m(tokens) - expected).abs().max() / expected.abs().max()).item() < 1e-4


def test_greedy_tokens_equal_transformers_generate(tmp_path):
    ref = hf_model(tmp_path).double()
    m = load(tmp_path).double()
    prompt = torch.randint(0, 61, (3, 4), generator=torch.Generator().manual_seed(3))
    expected = ref.generate(prompt, do_sample=False, max_new_tokens=12, pad_token_id=0)
    got = seqc.generate(m, prompt, 12)
    assert torch.equal(got, expected)
    assert len(set(got[:, 4:].flatten().tolist())) > 3      # not a degenerate repetition
    # one row alone, 1-D in and out
    assert torch.equal(seqc.generate(m, prompt[1], 12), expected[1])


def test_stop_token_ends_rows_independently_like_transformers(tmp_path):
    ref = hf_model(tmp_path).double()
    m = load(tmp_path).double()
    prompt = torch.randint(0, 61, (3, 4), generator=torch.Generator().manual_seed(3))
    free = seqc.generate(m, prompt, 12)
    stop = int(free[0, 6])                        # row 0 produces it at its third new token
    got = seqc.generate(m, prompt, 12, stop_token=stop)
    expected = ref.generate(prompt, do_sample=False, max_new_tokens=12, eos_token_id=stop, pad_token_id=stop)
    assert torch.equal(got, expected)
    first = (got[0, 4:] == stop).nonzero()[0, 0].item()
    assert (got[0, 4 + first:] == stop).all() and first <= 2
    assert not torch.equal(got[1:], torch.full_like(got[1:], stop))


def test_sampling_is_seeded_and_top_k_1_is_greedy(tmp_path):
    hf_model(tmp_path)
    m = load(tmp_path).double()
    prompt = torch.randint(0, 61, (2, 3), generator=torch.Generator().manual_seed(4))
    a = seqc.generate(m, prompt, 10, temperature=1.5, seed=7)
    assert torch.equal(a, seqc.generate(m, prompt, 10, temperature=1.5, seed=7))
    assert not torch.equal(a, seqc.generate(m, prompt, 10, temperature=1.5, seed=8))
    assert torch.equal(seqc.generate(m, prompt, 10, temperature=1.5, top_k=1, seed=3), seqc.generate(m, prompt, 10))
    assert torch.equal(seqc.generate(m, prompt, 10, temperature=0.7, top_p=1e-9, seed=3),
                       seqc.generate(m, prompt, 10))


def _ref_top_k(row, k):
    kth = sorted(row, reverse=True)[k - 1]
    return [v if v >= kth else -np.inf for v in row]


def _ref_top_p(row, p):
    probs = np.exp(np.array(row) - max(row))
    probs /= probs.sum()
    keep, mass = set(), 0.0
    for i in sorted(range(len(row)), key=lambda i: -row[i]):
        keep.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return [v if i in keep else -np.inf for i, v in enumerate(row)]


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 1.0])
def test_filters_match_hand_written_references(k, p):
    logits = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    for i, row in enumerate(logits.tolist()):
        assert filter_top_k(logits, k)[i].tolist() == _ref_top_k(row, k)
        assert filter_top_p(logits, p)[i].tolist() == _ref_top_p(row, p)
    # and transformers' warpers keep the same tokens
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    assert torch.equal(TopKLogitsWarper(k)(None, logits).isinf(), filter_top_k(logits, k).isinf())
    if p < 1:
        assert torch.equal(TopPLogitsWarper(p)(None, logits).isinf(), filter_top_p(logits, p).isinf())


@pytest.mark.parametrize("over,name", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(tie_word_embeddings=1), "tie_word_embeddings"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope_type"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
])
def test_unsupported_settings_are_refused_by_name(over, name):
    config = {"model_type": "llama", **BASE, **over}
    with pytest.raises(seqc.SeqcError, match=name):
        llama.spec_for_config(config)


def test_generate_argument_errors(tmp_path):
    hf_model(tmp_path)
    m = load(tmp_path)
    for kwargs, msg in [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
                        (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p")]:
        with pytest.raises(seqc.SeqcError, match=msg):
            seqc.generate(m, [[1, 2]], **{"max_new_tokens": 2, **kwargs})
    with pytest.raises(seqc.SeqcError, match="integer token ids"):
        seqc.generate(m, torch.zeros(1, 2), 2)
    with pytest.raises(seqc.SeqcError, match="torch-backend"):
        seqc.generate(seqc.compile("examples/llama.seq", backend="numpy"), [[1]], 2)
    assert seqc.generate(m, [[1, 2]], 0).tolist() == [[1, 2]]


def test_tied_embeddings_match_transformers(tmp_path):
    """tie_word_embeddings = true: transformers saves no lm_head.weight; the spec's head is
    linear(..., tie = embed_tokens), one parameter. Logits (float64 and float32), the KV-cache
    steps and greedy generate() agree with transformers."""
    from safetensors.torch import load_file
    ref = hf_model(tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    config = json.loads((tmp_path / "config.json").read_text())
    assert "tie = embed_tokens" in llama.spec_for_config(config)
    m = seqc.interop.from_pretrained(tmp_path).eval()
    assert m.lm_head.weight is m.embed_tokens.weight and "lm_head.weight" not in m.state_dict()
    tokens = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(tokens).logits
        assert ((m(tokens) - expected).abs().max() / expected.abs().max()).item() < 1e-4
        ref, m = ref.double(), m.double()
        expected, got = ref(tokens).logits, m(tokens)
        assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-6
        logits, state = m(tokens[:, :5], return_state=True)
        for t in range(5, 12):
            y, state = m.step(tokens[:, t], state)
            torch.testing.assert_close(y, got[:, t], rtol=1e-10, atol=1e-10)
    prompt = tokens[:, :4]
    expected = ref.generate(prompt, do_sample=False, max_new_tokens=12, pad_token_id=0)
    got = seqc.generate(m, prompt, 12)
    assert torch.equal(got, expected) and len(set(got[:, 4:].flatten().tolist())) > 3
    # an untied twin (same weights, head stored separately) is the same model
    untied = load_from_state(ref.state_dict(), tie_word_embeddings=False).double()
    with torch.no_grad():
        torch.testing.assert_close(untied(tokens), m(tokens), rtol=0, atol=0)


def load_from_state(sd, **over):
    config = {"model_type": "llama", **BASE, **over}
    m = seqc.compile(llama.spec_for_config(config))
    m.load_state_dict(llama.convert_state_dict(sd, config), strict=True)
    return m.eval()


def test_tied_config_with_a_different_head_is_refused(tmp_path):
    ref = hf_model(tmp_path, tie_word_embeddings=False)
    sd = dict(ref.state_dict())
    config = {"model_type": "llama", **BASE, "tie_word_embeddings": True}
    with pytest.raises(seqc.SeqcError, match="tie_word_embeddings is true but the checkpoint's 'lm_head.weight' "
                                             "differs"):
        llama.convert_state_dict(sd, config)
    del sd["lm_head.weight"]
    with pytest.raises(seqc.SeqcError, match="tie_word_embeddings is false but the checkpoint has no"):
        llama.convert_state_dict(sd, {**config, "tie_word_embeddings": False})
    # the stored head equal to the embedding (as older checkpoints keep it) loads
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    assert "lm_head.weight" not in llama.convert_state_dict(sd, config)


def test_sliding_window_matches_transformers_mistral(tmp_path):
    """Mistral = Llama + a sliding window: the llama block with window = 3, logits and greedy
    tokens (generation runs far past the window, through the trimmed KV cache)."""
    cfg = transformers.MistralConfig(**{**BASE, "sliding_window": 3, "head_dim": 4})
    torch.manual_seed(0)
    ref = transformers.MistralForCausalLM(cfg)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.3)
    ref = ref.double().eval()
    config = {**BASE, "model_type": "llama"}
    spec = llama.spec_for_config(config).replace("mlp_bias = mlp_bias)", "mlp_bias = mlp_bias, window = 3)")
    assert "window = 3" in spec
    m = seqc.compile(spec).double().eval()
    m.load_state_dict(llama.convert_state_dict(ref.state_dict(), config), strict=True)
    tokens = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(5))
    expected = ref(tokens).logits
    assert ((m(tokens) - expected).abs().max() / expected.abs().max()).item() < 1e-6
    unwindowed = seqc.compile(llama.spec_for_config(config)).double()
    unwindowed.load_state_dict(m.state_dict())
    assert ((unwindowed(tokens) - expected).abs().max() / expected.abs().max()).item() > 1e-3
    prompt = tokens[:, :4]
    assert torch.equal(seqc.generate(m, prompt, 10),
                       ref.generate(prompt, do_sample=False, max_new_tokens=10, pad_token_id=0))
