"""RecurrentGemma (Griffin / Hawk; transformers' ``RecurrentGemmaForCausalLM``,
model_type "recurrent_gemma") as a seqc spec.

The model: ``embed_tokens`` times ``sqrt(hidden_size)`` rounded to bfloat16
(transformers keeps that factor in a bfloat16 buffer and casts it to the
model's dtype; the spec writes the rounded number), the residual layers of
``std/recurrent_gemma_block.seq`` in the order of ``block_types`` repeated
(``recurrent``: Griffin's RG-LRU block; ``attention``: local sliding-window
attention with rotary embedding on ``partial_rotary_factor`` of each head and
``num_key_value_heads`` key/value heads), ``final_norm``, the head tied to the
embedding (``tie_word_embeddings``, the default) and the logits soft-cap
``tanh(logits / logits_soft_cap) * logits_soft_cap``.

Layer ``i`` of the checkpoint is layer ``i % P`` of the pattern (``P =
len(block_types)``): the spec repeats one period of the pattern as
``groups`` (``model.layers.{i}`` -> ``groups.{i // P}.layer{i % P}``), and the
layers after the last whole period are ``tail.layer{j}``.  RecurrentGemma's
RMSNorm multiplies by ``1 + weight``; the converted checkpoint holds
``weight + 1`` for seqc's ``rmsnorm``.

Honoured: hidden_size, intermediate_size (the MLP is ``intermediate_size // 2``
wide, as transformers builds it), num_hidden_layers, num_attention_heads,
num_key_value_heads, lru_width, conv1d_width, attention_window_size,
block_types, rms_norm_eps, rope theta and partial_rotary_factor,
attention_bias, logits_soft_cap, tie_word_embeddings, vocab_size.  Refused by
name: another hidden_activation than gelu_pytorch_tanh, rope scaling, block
types other than recurrent / attention, a rotary width that is not even.
Ignored (training or bookkeeping only): dropouts, w_init_variance_scale,
final_w_init_variance_scale, token ids, use_cache.
"""
from __future__ import annotations

import math

from ...errors import SeqcError

MODEL_TYPES = ("recurrent_gemma",)
ARCH = "RecurrentGemma"
KINDS = {"recurrent": "RecurrentGemmaRecurrentLayer", "attention": "RecurrentGemmaAttentionLayer"}
TANH_GELU = ("gelu_pytorch_tanh",)


def _refuse(setting: str, value, why: str):
    raise SeqcError(f"{ARCH} checkpoint: {setting} = {value!r} is not supported: {why}")


def _int(config: dict, key: str, default=None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SeqcError(f"{ARCH} config: '{key}' must be a positive integer, got {value!r}")
    return value


def _float(value, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise SeqcError(f"{ARCH} config: '{what}' must be a positive number, got {value!r}")
    return float(value)


def _bool(config: dict, key: str, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise SeqcError(f"{ARCH} config: '{key}' must be true or false, got {value!r}")
    return value


def _rope(config: dict) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from rope_parameters (transformers >= 5) or the top level."""
    params = config.get("rope_parameters")
    params = params if isinstance(params, dict) else {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        _refuse("rope_parameters.rope_type", kind, "only the default rotary embedding is expressible")
    scaling = config.get("rope_scaling")
    if scaling is not None:
        _refuse("rope_scaling", scaling, "only the default rotary embedding is expressible")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5))
    return _float(theta, "rope_theta"), _float(factor, "partial_rotary_factor")


def embedding_scale(hidden_size: int) -> float:
    """sqrt(hidden_size) rounded to bfloat16, the factor transformers multiplies the embedding by."""
    import torch
    return float(torch.tensor(hidden_size ** 0.5, dtype=torch.bfloat16).item())


def layer_types(config: dict) -> list[str]:
    """transformers' layers_block_type: block_types repeated, cut to num_hidden_layers."""
    types = config.get("block_types", ("recurrent", "recurrent", "attention"))
    if not isinstance(types, (list, tuple)) or not types:
        raise SeqcError(f"{ARCH} config: 'block_types' must be a non-empty list, got {types!r}")
    for t in types:
        if t not in KINDS:
            _refuse("block_types", t, "a layer is 'recurrent' (RG-LRU) or 'attention' (local attention)")
    return list(types)


def settings(config: dict) -> dict:
    """The spec's parameters from a config.json dict (SeqcError naming any unsupported setting)."""
    act = config.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in TANH_GELU:
        _refuse("hidden_activation", act, "RecurrentGemma's MLP and recurrent block use GELU's tanh "
                                          "approximation (gelu_pytorch_tanh)")
    d, heads = _int(config, "hidden_size"), _int(config, "num_attention_heads")
    if d % heads:
        raise SeqcError(f"{ARCH} config: hidden_size {d} does not divide into {heads} heads")
    head_dim = d // heads                              # transformers sets head_dim so, whatever config.json says
    kv = config.get("num_key_value_heads") or heads
    kv = _int({"num_key_value_heads": kv}, "num_key_value_heads")
    if heads % kv:
        raise SeqcError(f"{ARCH} config: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    lru = config.get("lru_width") or d
    lru = _int({"lru_width": lru}, "lru_width")
    if lru % heads:
        raise SeqcError(f"{ARCH} config: lru_width {lru} does not divide into {heads} heads (the RG-LRU gates "
                        f"are block-diagonal per head)")
    theta, factor = _rope(config)
    rope_dim = int(head_dim * factor)
    if rope_dim % 2 or not 0 < rope_dim <= head_dim:
        _refuse("partial_rotary_factor", factor, f"it gives a rotary width {rope_dim} of the head's {head_dim} "
                                                 f"features; seqc rotates an even number of features, at least 2")
    d_ff = _int(config, "intermediate_size") // 2
    if d_ff <= 0:
        raise SeqcError(f"{ARCH} config: intermediate_size must be at least 2 (the MLP is intermediate_size // 2 "
                        f"wide)")
    return dict(vocab=_int(config, "vocab_size"), d_model=d, n_layers=_int(config, "num_hidden_layers"),
                heads=heads, kv_heads=kv, lru_width=lru, d_ff=d_ff, conv_width=_int(config, "conv1d_width", 4),
                window=_int(config, "attention_window_size", 2048), rope_dim=rope_dim, rope_theta=theta,
                attention_bias=_bool(config, "attention_bias", False),
                eps=_float(config.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
                cap=_float(config.get("logits_soft_cap", 30.0), "logits_soft_cap"),
                tied=_bool(config, "tie_word_embeddings", True), types=layer_types(config))


def layer_name(i: int, config: dict) -> str:
    """The spec's name of the checkpoint's layer i (module docstring)."""
    s = settings(config)
    period = len(s["types"])
    groups = s["n_layers"] // period
    g, j = divmod(i, period)
    return f"groups.{g}.layer{j}" if g < groups else f"tail.layer{j}"


def _literal(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


def _call(prefix: str, args: list[str], suffix: str, width: int = 110) -> str:
    """`prefix` + args joined by ", " + `suffix`, wrapped under the opening bracket."""
    lines, line = [], prefix
    for i, arg in enumerate(args):
        piece = arg + (", " if i < len(args) - 1 else suffix)
        if len(line) + len(piece.rstrip()) > width and line.strip():
            lines.append(line.rstrip())
            line = " " * len(prefix)
        line += piece
    return "\n".join(lines + [line]) + "\n"


LAYER_ARGS = {"RecurrentGemmaRecurrentLayer": ("d_model", "lru_width", "heads", "d_ff", "conv_width", "eps"),
              "RecurrentGemmaAttentionLayer": ("d_model", "heads", "kv_heads", "d_ff", "window", "rope_dim",
                                               "rope_theta", "attention_bias", "eps")}


def _layers(kinds: list[str]) -> str:
    return "".join(_call(f"  x = {KINDS[k]}(", ["x"] + [f"{a} = {a}" for a in LAYER_ARGS[KINDS[k]]],
                         f") as layer{j}") for j, k in enumerate(kinds))


def spec_for_config(config: dict) -> str:
    s = settings(config)
    types, period = s["types"], len(s["types"])
    groups, rest = divmod(s["n_layers"], period)
    keys = ("d_model", "heads", "kv_heads", "lru_width", "d_ff", "conv_width", "window", "rope_dim", "rope_theta",
            "attention_bias", "eps")
    blocks, body = "", ""
    for name, kinds, count in (("Period", types, groups), ("Tail", types[:rest], 1 if rest else 0)):
        if not count:
            continue
        blocks += f"\n# layers of kinds {', '.join(kinds)}\n" + _call(f"block {name}(", list(keys), ") {") \
            + f"  input x: [B, L, d_model]\n{_layers(kinds)}  return x\n}}\n"
        repeat, alias = (f"repeat({count}) ", "groups") if name == "Period" else ("", "tail")
        body += _call(f"  x = {repeat}{name}(", ["x"] + [f"{k} = {k}" for k in keys], f") as {alias}")
    head = _call("model RecurrentGemmaForCausalLM(", [f"{k} = {_literal(s[k])}" for k in ("vocab", *keys, "cap")],
                 ") {")
    tie = ", tie = embed_tokens" if s["tied"] else ""
    return f"""include "std/recurrent_gemma_block.seq"
{blocks}
{head}  input tokens: [B, L] int
  embed_tokens = embedding(tokens, vocab = vocab, dim = d_model)
  x = embed_tokens * {_literal(embedding_scale(s["d_model"]))}      # sqrt(hidden_size) in bfloat16
{body}  final_norm = rmsnorm(x, eps = eps)
  lm_head = linear(final_norm, vocab, bias = false{tie})
  return tanh(lm_head / cap) * cap
}}
"""


NORMS = ("temporal_pre_norm.weight", "channel_pre_norm.weight")


def _plus_one(w):
    """1 + w, added in float64 and rounded once to the checkpoint's dtype."""
    import torch
    w = torch.as_tensor(w)
    return (w.double() + 1).to(w.dtype)


def convert_state_dict(state_dict: dict, config: dict) -> dict:
    """transformers' keys -> the spec's (module docstring); RMSNorm weights + 1; a tied head reads
    embed_tokens.weight, so a stored lm_head.weight must equal it and is dropped."""
    import re

    import torch
    s = settings(config)
    out = {}
    for key, value in state_dict.items():
        if key.endswith("rotary_emb.inv_freq") or key.endswith("normalizer"):
            continue
        name = key[len("model."):] if key.startswith("model.") else key
        m = re.match(r"layers\.(\d+)\.(.*)$", name)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if i >= s["n_layers"]:
                raise SeqcError(f"{ARCH} checkpoint has '{key[:120]}' but the config has "
                                f"{s['n_layers']} layers")
            name = f"{layer_name(i, config)}.{rest}"
            if rest in NORMS:
                value = _plus_one(value)
        elif name == "final_norm.weight":
            value = _plus_one(value)
        out[name] = value
    if s["tied"]:
        head, emb = out.pop("lm_head.weight", None), out.get("embed_tokens.weight")
        if emb is None:
            raise SeqcError(f"{ARCH} checkpoint has no 'model.embed_tokens.weight'")
        if head is not None and not (tuple(head.shape) == tuple(emb.shape)
                                     and torch.equal(torch.as_tensor(head), torch.as_tensor(emb))):
            raise SeqcError(f"{ARCH} checkpoint: tie_word_embeddings is true but the checkpoint's 'lm_head.weight' "
                            f"differs from 'model.embed_tokens.weight'")
    elif "lm_head.weight" not in out:
        raise SeqcError(f"{ARCH} checkpoint: tie_word_embeddings is false but the checkpoint has no "
                        f"'lm_head.weight'")
    return out
