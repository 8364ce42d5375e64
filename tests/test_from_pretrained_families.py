"""from_pretrained on real save_pretrained directories of the Mamba-2 and Llama families (config.json as
transformers writes it, e.g. an infinite time_step_limit as {"__float__": "Infinity"})."""
from __future__ import annotations

import pytest
import torch

import seqc

transformers = pytest.importorskip("transformers")


def _models():
    torch.manual_seed(0)
    yield "mamba2", transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=50, hidden_size=32, num_heads=4, head_dim=16, state_size=8, n_groups=2, num_hidden_layers=2,
        expand=2, conv_kernel=4, chunk_size=8, tie_word_embeddings=False))
    yield "llama", transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False))


@pytest.mark.parametrize("family", ["mamba2", "llama"])
def test_save_pretrained_directory_loads_in_one_call(tmp_path, family):
    model = dict(_models())[family].double().eval()
    model.save_pretrained(tmp_path)
    ours = seqc.interop.from_pretrained(tmp_path).double().eval()
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        ref, got = model(x).logits, ours(x)
    # transformers keeps parts of both models in float32 even after .double() (measured ~2e-7)
    assert float((ref - got).abs().max() / ref.abs().max()) < 1e-5
