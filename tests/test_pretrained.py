"""seqc.interop.from_pretrained against transformers' MambaForCausalLM and
FalconMambaForCausalLM, built tiny from configs in the test and saved with
save_pretrained (safetensors, single file and sharded)."""
from __future__ import annotations

import json
import os

import pytest
import torch

import seqc
from conftest import assert_agree

transformers = pytest.importorskip("transformers")

VOCAB = 40
# transformers computes its RMSNorms, A = -exp(A_log) and the logits in float32 even in a float64
# model, so the two agree to float32 rounding (measured: ~3e-7 relative)
TOL = 1e-5


def _hf(kind="mamba", seed=0, **overrides):
    torch.manual_seed(seed)
    if kind == "mamba":
        cfg = transformers.MambaConfig
        cls = transformers.MambaForCausalLM
    else:
        cfg = transformers.FalconMambaConfig
        cls = transformers.FalconMambaForCausalLM
    c = dict(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=3,
             time_step_rank=3, residual_in_fp32=False)
    c.update(overrides)
    model = cls(cfg(**c)).double().eval()
    with torch.no_grad():               # move the weights away from their init so every one matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _save(model, path, **kw):
    model.save_pretrained(str(path), **kw)
    return str(path)


def _logits(ref, tokens):
    with torch.no_grad():
        return ref(tokens).logits.double()


@pytest.mark.parametrize("kind", ["mamba", "falcon_mamba"])
def test_logits_and_greedy_decoding_match_transformers(kind, tmp_path):
    ref = _hf(kind)
    model = seqc.interop.from_pretrained(_save(ref, tmp_path / kind))
    assert next(model.parameters()).dtype == torch.float64
    # tie_word_embeddings: one parameter, under the embedding's key, shared by the head
    assert "lm_head.weight" not in model.state_dict() and model.lm_head.weight is model.embeddings.weight
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_agree(_logits(ref, tokens), model(tokens), TOL, "forward logits")
        # prompt through the forward, then greedy decoding one token at a time through the state API
        logits, state = model(tokens, return_state=True)
        nxt = logits[:, -1].argmax(-1)
        ours = [nxt]
        seq = torch.cat([tokens, nxt[:, None]], 1)
        for _ in range(5):
            step_logits, state = model.step(nxt, state)
            assert_agree(_logits(ref, seq)[:, -1], step_logits, TOL, "step logits")
            nxt = step_logits.argmax(-1)
            ours.append(nxt)
            seq = torch.cat([seq, nxt[:, None]], 1)
        theirs = ref.generate(tokens, max_new_tokens=6, do_sample=False, pad_token_id=0)[:, tokens.shape[1]:]
    assert torch.equal(torch.stack(ours, 1), theirs)


def test_falcon_mamba_norms_are_computed_not_dropped(tmp_path):
    """The same FalconMamba weights read as plain Mamba (no dt/B/C norms) give other logits: the
    norms in the spec are what makes the falcon_mamba test pass."""
    ref = _hf("falcon_mamba")
    path = _save(ref, tmp_path / "f")
    assert seqc.interop.spec_for(path).count("rms(") == 3
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["model_type"] = "mamba"
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    tokens = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (_logits(ref, tokens) - seqc.interop.from_pretrained(path)(tokens)).abs().max()
    assert diff > 1e-2


def test_sharded_untied_checkpoint_with_biases_and_settings(tmp_path):
    ref = _hf("mamba", seed=1, tie_word_embeddings=False, use_bias=True, use_conv_bias=False,
              layer_norm_epsilon=1e-2)
    assert not torch.equal(ref.lm_head.weight, ref.backbone.embeddings.weight)
    path = _save(ref, tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    spec = seqc.interop.spec_for(path)
    assert "eps = 0.01" in spec and "bias = true" in spec
    model = seqc.interop.from_pretrained(path)
    assert "layers.0.mixer.in_proj.bias" in model.state_dict()
    assert "layers.0.mixer.conv1d.bias" not in model.state_dict()
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_agree(_logits(ref, tokens), model(tokens), TOL)


def test_layer_norm_epsilon_is_honoured(tmp_path):
    """eps 1e-2 changes the output measurably; loading it as 1e-5 would not match."""
    ref = _hf("mamba", layer_norm_epsilon=1e-2)
    path = _save(ref, tmp_path / "eps")
    tokens = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_agree(_logits(ref, tokens), seqc.interop.from_pretrained(path)(tokens), TOL)
        cfg = json.load(open(os.path.join(path, "config.json")))
        cfg["layer_norm_epsilon"] = 1e-5
        json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
        wrong = seqc.interop.from_pretrained(path)(tokens)
    assert (_logits(ref, tokens) - wrong).abs().max() > 1e-3


def test_refusals_name_the_architecture_and_setting(tmp_path):
    path = _save(_hf("mamba", hidden_act="gelu"), tmp_path / "gelu")
    with pytest.raises(seqc.SeqcError, match="MambaForCausalLM: hidden_act = 'gelu'"):
        seqc.interop.from_pretrained(path)
    with pytest.raises(seqc.SeqcError, match="hidden_act"):
        seqc.interop.spec_for(path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["model_type"] = "jamba"
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(seqc.SeqcError, match="model_type 'jamba' is not supported.*falcon_mamba.*mamba"):
        seqc.interop.from_pretrained(path)
    path = _save(_hf("mamba", residual_in_fp32=True), tmp_path / "fp32")
    with pytest.raises(seqc.SeqcError, match="residual_in_fp32"):
        seqc.interop.from_pretrained(path, dtype=torch.bfloat16)


def test_bad_directories_are_located_errors(tmp_path):
    path = _save(_hf("mamba", tie_word_embeddings=False), tmp_path / "m")
    with pytest.raises(seqc.SeqcError, match="no config.json"):
        seqc.interop.from_pretrained(str(tmp_path))
    index = {"weight_map": {"lm_head.weight": "../model.safetensors"}}
    json.dump(index, open(os.path.join(path, "model.safetensors.index.json"), "w"))
    with pytest.raises(seqc.SeqcError, match="not a plain file name"):
        seqc.interop.from_pretrained(path)
    os.remove(os.path.join(path, "model.safetensors.index.json"))
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:     # truncate the data section
        f.truncate(os.path.getsize(os.path.join(path, "model.safetensors")) - 8)
    with pytest.raises(seqc.SeqcError, match="truncated or corrupt"):
        seqc.interop.from_pretrained(path)


def test_import_command_prints_the_spec(tmp_path, capsys):
    from seqc.cli import main
    path = _save(_hf("mamba"), tmp_path / "m")
    assert main(["import", path]) == 0
    out = capsys.readouterr().out
    assert out == seqc.interop.spec_for(path)
    seqc.build_graph(source=out)               # the printed spec compiles on its own
    assert main(["import", str(tmp_path / "missing")]) == 2


def test_tied_config_with_a_different_head_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    path = _save(_hf("mamba"), tmp_path / "t")
    file = os.path.join(path, "model.safetensors")
    sd = load_file(file)
    sd["lm_head.weight"] = sd["backbone.embeddings.weight"] + 1.0
    save_file(sd, file)
    with pytest.raises(seqc.SeqcError, match="tie_word_embeddings is true but the checkpoint's 'lm_head.weight' "
                                             "differs"):
        seqc.interop.from_pretrained(path)


def test_a_single_checkpoint_file_is_read_in_mamba_ssm_layout(tmp_path):
    from mambapy.mamba import Mamba, MambaConfig
    torch.manual_seed(0)
    ref = Mamba(MambaConfig(d_model=16, n_layers=1, d_state=4, expand_factor=2, d_conv=3)).double()
    torch.save(ref.state_dict(), tmp_path / "m.pt")
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        assert_agree(ref(x), seqc.interop.from_pretrained(tmp_path / "m.pt")(x), 1e-9)
    assert "MambaBlock(" in seqc.interop.spec_for(tmp_path / "m.pt")
