"""Hugging Face ``Mamba2ForCausalLM`` / ``Mamba2Model`` checkpoints (transformers'
``model_type = "mamba2"``): the equivalent ``.seq`` model built from
``std/mamba2_block.seq`` and the key mapping.

Expressed: embeddings, ``num_hidden_layers`` pre-norm Mamba-2 blocks (in_proj
split into [z, xBC, dt], causal depthwise conv over xBC with silu, SSD with
``num_heads`` x ``head_dim``, ``n_groups``, ``state_size``, dt_bias + softplus,
D skip, gated group RMSNorm, out_proj), ``norm_f`` and ``lm_head`` (tied to the
embedding when ``tie_word_embeddings``).  Refused by name: projection biases
(``use_bias``), activations other than silu, a non-trivial
``time_step_limit`` clamp, ``num_heads * head_dim != expand * hidden_size``,
and ``layer_types`` other than all-mamba.  ``chunk_size`` becomes the SSD
layer's ``chunk`` (it changes the order of floating-point sums, not the result).
"""
from __future__ import annotations

import math

from ...errors import SeqcError

MODEL_TYPES = ("mamba2",)
_ARCH = "Mamba2"


def _get(config: dict, key: str, default):
    value = config.get(key, default)
    return default if value is None else value


def _refuse(setting: str, why: str):
    raise SeqcError(f"{_ARCH} checkpoint: {setting} is not supported by seqc's Mamba-2 ({why})")


def _numbers(config: dict) -> dict:
    hidden = int(_get(config, "hidden_size", 4096))
    expand = _get(config, "expand", 2)
    heads, head_dim = int(_get(config, "num_heads", 128)), int(_get(config, "head_dim", 64))
    if heads * head_dim != int(expand * hidden):
        _refuse(f"num_heads * head_dim = {heads * head_dim}",
                f"the mixer needs it to equal expand * hidden_size = {int(expand * hidden)}")
    groups = int(_get(config, "n_groups", 8))
    if heads % groups:
        _refuse(f"n_groups = {groups}", f"it must divide num_heads = {heads}")
    if _get(config, "use_bias", False):
        _refuse("use_bias = true", "in_proj / out_proj biases are not expressed")
    act = _get(config, "hidden_act", "silu")
    if act != "silu":
        _refuse(f"hidden_act = {act!r}", "the conv activation is silu")
    limit = tuple(float(v) for v in _get(config, "time_step_limit", (0.0, math.inf)))
    if len(limit) != 2 or limit[0] > 0.0 or limit[1] != math.inf:
        _refuse(f"time_step_limit = {list(limit)}", "dt is not clamped; only (0.0, inf) is exact")
    layer_types = config.get("layer_types")
    if layer_types and any(t != "mamba" for t in layer_types):
        _refuse(f"layer_types = {sorted(set(layer_types))}", "only Mamba-2 layers")
    return dict(d_model=hidden, n_layers=int(_get(config, "num_hidden_layers", 64)), heads=heads,
                head_dim=head_dim, d_state=int(_get(config, "state_size", 128)), n_groups=groups,
                d_conv=int(_get(config, "conv_kernel", 4)), chunk=int(_get(config, "chunk_size", 256)),
                conv_bias=bool(_get(config, "use_conv_bias", True)),
                eps=float(_get(config, "layer_norm_epsilon", 1e-5)), vocab=int(_get(config, "vocab_size", 32768)),
                tied=bool(_get(config, "tie_word_embeddings", False)))


def spec_for_config(config: dict) -> str:
    """The .seq source of the language model this config describes."""
    c = _numbers(config)
    params = ", ".join(f"{k} = {c[k]}" for k in ("d_model", "n_layers", "heads", "head_dim", "d_state", "n_groups",
                                                   "d_conv", "chunk", "vocab"))
    block = ", ".join(f"{k} = {k}" for k in ("d_model", "heads", "head_dim", "d_state", "n_groups", "d_conv",
                                              "chunk"))
    return (f'include "std/mamba2_block.seq"\n\n'
            f"model Mamba2Checkpoint({params}) {{\n"
            f"  input tokens: [B, L] int\n"
            f"  embeddings = embedding(tokens, vocab = vocab, dim = d_model)\n"
            f"  x = repeat(n_layers) Mamba2Block(embeddings, {block}, eps = {c['eps']!r}, "
            f"conv_bias = {'true' if c['conv_bias'] else 'false'}) as layers\n"
            f"  norm_f = rmsnorm(x, eps = {c['eps']!r})\n"
            f"  lm_head = linear(norm_f, vocab, bias = false)\n"
            f"  return lm_head\n}}\n")


def convert_state_dict(state_dict: dict, config: dict) -> dict:
    """transformers' keys (``backbone.`` prefix optional, ``embedding.`` accepted
    for ``embeddings.``) -> the spec's; a tied or missing ``lm_head.weight``
    is the embedding."""
    c = _numbers(config)
    out = {}
    for key, value in state_dict.items():
        k = key[len("backbone."):] if key.startswith("backbone.") else key
        if k.startswith("embedding."):
            k = "embeddings." + k[len("embedding."):]
        out[k] = value
    if "embeddings.weight" not in out:
        raise SeqcError(f"{_ARCH} checkpoint has no 'backbone.embeddings.weight'")
    if c["tied"] or "lm_head.weight" not in out:
        out["lm_head.weight"] = out["embeddings.weight"]
    return out
