"""Llama (transformers' ``LlamaForCausalLM``, model_type "llama") as a seqc spec:
the decoder layers of ``std/llama_block.seq`` (RMSNorm, rotary grouped-query
attention, SwiGLU MLP), embedding, final RMSNorm and ``lm_head`` (tied to the
embedding when ``tie_word_embeddings``: ``linear(..., tie = embed_tokens)``,
one parameter ``embed_tokens.weight``; a checkpoint without ``lm_head.weight``
loads, one whose ``lm_head.weight`` differs from the embedding is refused).

Every config setting that changes the computation is either honoured
(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
num_key_value_heads, head_dim, vocab_size, rms_norm_eps, attention_bias,
mlp_bias, rope theta, hidden_act silu, tie_word_embeddings) or refused by name
(another hidden_act, rope scaling of any type but "default").  Settings that
only matter for training or bookkeeping (dropouts, initializer_range,
pretraining_tp (the same product computed in slices), token ids, use_cache,
max_position_embeddings with default rope) are ignored."""
from __future__ import annotations

from ...errors import SeqcError

MODEL_TYPES = ("llama",)

SILU = ("silu", "swish")


def _refuse(setting: str, value, why: str):
    raise SeqcError(f"Llama checkpoint: {setting} = {value!r} is not supported: {why}")


def _int(config: dict, key: str) -> int:
    if key not in config or not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] <= 0:
        raise SeqcError(f"Llama config: '{key}' must be a positive integer, got {config.get(key)!r}")
    return config[key]


def rope_theta(config: dict) -> float:
    """The rotary base; refuses every rope scaling (linear, dynamic, yarn, llama3, ...)."""
    params = config.get("rope_parameters")
    scaling = config.get("rope_scaling")
    if isinstance(params, dict):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            _refuse("rope_parameters.rope_type", kind, "only the default rotary embedding is expressible")
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    else:
        theta = config.get("rope_theta", 10000.0)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind not in (None, "default"):
            _refuse("rope_scaling", scaling, "only the default rotary embedding is expressible")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise SeqcError(f"Llama config: rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def llama_settings(config: dict) -> dict:
    """The spec's parameters from a config.json dict (SeqcError naming any unsupported setting)."""
    act = config.get("hidden_act", "silu")
    if act not in SILU:
        _refuse("hidden_act", act, "the Llama MLP here is down_proj(silu(gate_proj(x)) * up_proj(x))")
    tied = config.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise SeqcError(f"Llama config: 'tie_word_embeddings' must be true or false, got {tied!r}")
    d, heads = _int(config, "hidden_size"), _int(config, "num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or d // heads
    if not config.get("head_dim") and d % heads:
        raise SeqcError(f"Llama config: hidden_size {d} does not divide into {heads} heads and no head_dim is given")
    if heads % kv:
        raise SeqcError(f"Llama config: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    eps = config.get("rms_norm_eps", 1e-6)
    for key in ("attention_bias", "mlp_bias"):
        if not isinstance(config.get(key, False), bool):
            raise SeqcError(f"Llama config: '{key}' must be true or false, got {config[key]!r}")
    return dict(d_model=d, n_heads=heads, kv_heads=kv, head_dim=head_dim, n_layers=_int(config, "num_hidden_layers"),
                d_ff=_int(config, "intermediate_size"), vocab=_int(config, "vocab_size"), rope_theta=rope_theta(config),
                eps=float(eps), attention_bias=bool(config.get("attention_bias", False)),
                mlp_bias=bool(config.get("mlp_bias", False)), tied=tied)


def _literal(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


def spec_for_config(config: dict) -> str:
    s = llama_settings(config)
    tie = ", tie = embed_tokens" if s.pop("tied") else ""
    head = ", ".join(f"{k} = {_literal(v)}" for k, v in s.items())
    return f"""include "std/llama_block.seq"

model LlamaForCausalLM({head}) {{
  input tokens: [B, L] int
  embed_tokens = embedding(tokens, vocab = vocab, dim = d_model)
  x = repeat(n_layers) LlamaDecoderLayer(embed_tokens, d_model = d_model, n_heads = n_heads, kv_heads = kv_heads,
                                         d_ff = d_ff, head_dim = head_dim, rope_theta = rope_theta, eps = eps,
                                         attention_bias = attention_bias, mlp_bias = mlp_bias) as layers
  norm = rmsnorm(x, eps = eps)
  lm_head = linear(norm, vocab, bias = false{tie})
  return lm_head
}}
"""


def convert_state_dict(state_dict: dict, config: dict) -> dict:
    """transformers' keys (model.embed_tokens, model.layers.{i}.*, model.norm, lm_head) -> the spec's
    (the same without "model."); rotary inv_freq buffers of older checkpoints are dropped.  A tied
    head reads embed_tokens.weight, so a stored lm_head.weight must equal it and is dropped."""
    import torch
    tied = llama_settings(config)["tied"]
    out = {}
    for key, value in state_dict.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name = key[len("model."):] if key.startswith("model.") else key
        out[name] = value
    if tied:
        head, emb = out.pop("lm_head.weight", None), out.get("embed_tokens.weight")
        if emb is None:
            raise SeqcError("Llama checkpoint has no 'model.embed_tokens.weight'")
        if head is not None and not (tuple(head.shape) == tuple(emb.shape)
                                     and torch.equal(torch.as_tensor(head), torch.as_tensor(emb))):
            raise SeqcError("Llama checkpoint: tie_word_embeddings is true but the checkpoint's 'lm_head.weight' "
                            "differs from 'model.embed_tokens.weight'")
    elif "lm_head.weight" not in out:
        raise SeqcError("Llama checkpoint: tie_word_embeddings is false but the checkpoint has no "
                        "'lm_head.weight'")
    return out
