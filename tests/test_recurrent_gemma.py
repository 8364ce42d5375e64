"""RecurrentGemma end to end (seqc/interop/families/recurrent_gemma.py, std/recurrent_gemma_block.seq)
against a tiny randomly initialised transformers RecurrentGemmaForCausalLM saved with save_pretrained:
logits in float64 (transformers' float32-only pieces - RMSNorm, rotary angles, the RG-LRU accumulator -
switched to float64 with the same formulas) and in float32 as transformers runs, prefill + step()
decoding, greedy tokens from its generate(), and the settings refused by name."""
from __future__ import annotations

import functools
import json

import pytest
import torch

import seqc
from seqc.interop.families import recurrent_gemma as family

transformers = pytest.importorskip("transformers")
from transformers.models.recurrent_gemma import modeling_recurrent_gemma as hf  # noqa: E402

# hidden 24 / 3 heads: head_dim 8, rotary on its first 4 features; one key/value head (MQA); 5 layers:
# one whole (recurrent, recurrent, attention) period and a (recurrent, recurrent) tail; window 3
BASE = dict(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=5, num_attention_heads=3,
            num_key_value_heads=1, lru_width=18, attention_window_size=3, conv1d_width=3, logits_soft_cap=4.0,
            rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 300.0,
                                                "partial_rotary_factor": 0.5},
            bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa")


def hf_model(tmp_path, double=False, **over):
    """The model, saved to tmp_path (in float64, transformers' float32-only pieces switched to float64,
    with double=True)."""
    cfg = transformers.RecurrentGemmaConfig(**{**BASE, **over})
    torch.manual_seed(0)
    model = transformers.RecurrentGemmaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():      # random everything (the init zeroes norms and biases)
            if name.endswith("recurrent_param"):
                p.uniform_(-1.0, 3.0)
            else:
                p.normal_(0.0, 0.3 if p.dim() > 1 or "norm" in name else 0.2)
    if double:
        model = float64_transformers(model)
    model.save_pretrained(tmp_path)
    return model.eval()


def float64_transformers(model):
    """transformers computes RMSNorm, the rotary angles and the RG-LRU accumulation in float32 whatever
    the model's dtype; the same formulas in float64, so float64 logits can be compared tightly."""
    def norm(m, x):
        return m._norm(x) * (1.0 + m.weight)

    def rotary(m, x, position_ids):
        params = m.config.rope_parameters
        dim = int(m.config.head_dim * params["partial_rotary_factor"])
        inv_freq = 1.0 / params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        freqs = position_ids[..., None].double() * inv_freq
        emb = torch.cat((freqs, freqs), -1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    model = model.double()
    for m in model.modules():
        if isinstance(m, hf.RecurrentGemmaRMSNorm):
            m.forward = functools.partial(norm, m)
        elif isinstance(m, hf.RecurrentGemmaRotaryEmbedding):
            m.forward = functools.partial(rotary, m)
        elif isinstance(m, hf.RecurrentGemmaRglru):
            m._rnn_scan = functools.partial(type(m)._rnn_scan, m, acc_dtype=torch.float64)
    return model


def rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("over", [{}, dict(tie_word_embeddings=False, attention_bias=True, logits_soft_cap=30.0,
                                           block_types=["attention", "recurrent"], num_hidden_layers=3),
                                  dict(block_types=["recurrent"], num_hidden_layers=2)],
                         ids=["tied-mqa-tail", "untied-bias-pattern", "hawk"])
def test_logits_and_steps_match_transformers_float64(tmp_path, over):
    ref = hf_model(tmp_path, double=True, **over)
    m = seqc.interop.from_pretrained(tmp_path).eval()
    assert m.embed_tokens.weight.dtype == torch.float64
    tokens = torch.randint(0, 61, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(tokens, use_cache=False).logits
        got = m(tokens)
        assert rel(got, want) < 1e-10, rel(got, want)
        # prefill then one token at a time (KV cache trimmed to the window, RG-LRU and conv states)
        _, state = m(tokens[:, :4], return_state=True)
        for t in range(4, 11):
            y, state = m.step(tokens[:, t], state)
            torch.testing.assert_close(y, got[:, t], rtol=1e-10, atol=1e-10)


def test_pieces_matter(tmp_path):
    """Each of the pieces the family adds changes the logits at the float64 tolerance: the soft-cap, the
    bfloat16-rounded embedding scale (sqrt(24) = 4.899 -> 4.90625), the partial rotary, the (1 + w) norms."""
    ref = hf_model(tmp_path, double=True)
    config = json.loads((tmp_path / "config.json").read_text())
    spec = family.spec_for_config(config)
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(tokens, use_cache=False).logits
    sd = family.convert_state_dict(ref.state_dict(), config)
    assert family.embedding_scale(24) == 4.90625 and "embed_tokens * 4.90625" in spec
    variants = {"cap": spec.replace("return tanh(lm_head / cap) * cap", "return lm_head"),
                "scale": spec.replace("embed_tokens * 4.90625", f"embed_tokens * {24 ** 0.5!r}"),
                "rotary": spec.replace("rope_dim = 4,", "rope_dim = 8,")}
    for what, src in variants.items():
        assert src != spec, what
        m = seqc.compile(src).double().eval()
        m.load_state_dict(sd, strict=True)
        with torch.no_grad():
            assert rel(m(tokens), want) > 1e-6, what
    m = seqc.compile(spec).double().eval()
    m.load_state_dict({k: v - 1 if k.endswith("norm.weight") else v for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        assert rel(m(tokens), want) > 1e-6, "norm + 1"


def test_float32_logits(tmp_path):
    """As transformers runs it in float32 (its float32 norms, rotary, accumulator): measured ~1e-6."""
    ref = hf_model(tmp_path)
    m = seqc.interop.from_pretrained(tmp_path).eval()
    assert m.embed_tokens.weight.dtype == torch.float32
    tokens = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        err = rel(m(tokens), ref(tokens, use_cache=False).logits)
    assert err < 2e-5, err


def test_greedy_tokens_equal_transformers_generate(tmp_path):
    ref = hf_model(tmp_path, double=True)
    m = seqc.interop.from_pretrained(tmp_path).eval()
    assert m.embed_tokens.weight.dtype == torch.float64
    prompt = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(4))
    want = ref.generate(prompt, do_sample=False, max_new_tokens=12, pad_token_id=0)
    got = seqc.generate(m, prompt, 12)
    assert torch.equal(got, want), (got, want)
    assert len(set(got[:, 4:].flatten().tolist())) > 3          # not a degenerate repetition


def test_tied_head_is_one_parameter_and_a_different_head_is_refused(tmp_path):
    from safetensors.torch import load_file
    ref = hf_model(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    m = seqc.interop.from_pretrained(tmp_path)
    assert m.lm_head.weight is m.embed_tokens.weight
    config = json.loads((tmp_path / "config.json").read_text())
    sd = dict(ref.state_dict())
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] + 1
    with pytest.raises(seqc.SeqcError, match="lm_head.weight' differs"):
        family.convert_state_dict(sd, config)


@pytest.mark.parametrize("over,name", [
    (dict(hidden_activation="gelu"), "hidden_activation"),
    (dict(block_types=["recurrent", "mlp"]), "block_types"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope_type"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.1}),
     "partial_rotary_factor"),
    (dict(lru_width=20), "lru_width"),
])
def test_unsupported_settings_are_refused_by_name(over, name):
    config = {"model_type": "recurrent_gemma", **BASE, **over}
    with pytest.raises(seqc.SeqcError, match=name):
        family.spec_for_config(config)
