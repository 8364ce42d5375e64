"""transformers' Mamba (``MambaForCausalLM``, model_type ``mamba``) and
FalconMamba (``FalconMambaForCausalLM``, model_type ``falcon_mamba``, see
``falcon_mamba.py``): config.json -> .seq spec, checkpoint keys -> the spec's.

The spec keeps transformers' layer names, so keys only lose the ``backbone.``
prefix and ``embeddings`` becomes the spec's ``embeddings`` layer unchanged:
``embeddings.weight``, ``layers.{i}.norm.weight``,
``layers.{i}.mixer.{in_proj,conv1d,x_proj,dt_proj,out_proj}.{weight,bias}``,
``layers.{i}.mixer.{A_log,D}``, ``norm_f.weight``, and ``lm_head.weight``
unless the head is tied to the embedding.

Config settings, each honoured or refused by name:
  hidden_size, num_hidden_layers, vocab_size, state_size, conv_kernel,
  expand / intermediate_size, time_step_rank ("auto" = ceil(hidden_size / 16)),
  layer_norm_epsilon (every RMSNorm's eps), use_bias (in_proj / out_proj
  bias), use_conv_bias, tie_word_embeddings (the head is
  ``linear(..., tie = embeddings)``: one parameter, ``embeddings.weight``; a
  checkpoint without ``lm_head.weight`` loads, one whose ``lm_head.weight``
  differs from the embedding is refused) - honoured.
  hidden_act: transformers applies it after the convolution AND to the gate
  z; seqc's selective_ssm gates with silu, so anything but "silu" is refused.
  residual_in_fp32: the residual stream is added in the model's dtype, which
  is exact for float32 / float64 models; a half-precision load with it set is
  refused (``check_dtype``).
  time_step_scale/min/max/init_scheme/floor, initializer_range,
  rescale_prenorm_residual: initialisation only (the checkpoint's weights are
  loaded), ignored.  use_cache, use_mambapy, use_associative_scan: how
  transformers runs, not what it computes, ignored.
"""
from __future__ import annotations

import math

from ...errors import SeqcError

MODEL_TYPES = ("mamba",)
ARCH = "MambaForCausalLM"


def _int(config, key, arch, default=None, minimum=1):
    v = config.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise SeqcError(f"{arch}: config '{key}' must be an integer >= {minimum}, got {v!r}")
    return v


def _bool(config, key, arch, default):
    v = config.get(key, default)
    if not isinstance(v, bool):
        raise SeqcError(f"{arch}: config '{key}' must be true or false, got {v!r}")
    return v


def _eps(config, key, arch, default):
    v = config.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        raise SeqcError(f"{arch}: config '{key}' must be a number in (0, 1), got {v!r}")
    return float(v)


def settings(config: dict, arch: str = ARCH) -> dict:
    """The numbers of the spec, every setting checked (see the module docstring)."""
    d_model = _int(config, "hidden_size", arch)
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise SeqcError(f"{arch}: hidden_act = {act!r} is not supported (transformers applies it after the "
                        f"convolution and to the gate; seqc's selective_ssm gates with silu only)")
    rank = config.get("time_step_rank", "auto")
    rank = math.ceil(d_model / 16) if rank == "auto" else _int(config, "time_step_rank", arch)
    expand = config.get("expand", 2)
    if isinstance(expand, bool) or not isinstance(expand, (int, float)) or expand <= 0:
        raise SeqcError(f"{arch}: config 'expand' must be a positive number, got {expand!r}")
    inner = config.get("intermediate_size", int(expand * d_model))
    inner = _int({"intermediate_size": inner}, "intermediate_size", arch)
    return dict(vocab=_int(config, "vocab_size", arch), d_model=d_model,
                n_layers=_int(config, "num_hidden_layers", arch), d_state=_int(config, "state_size", arch, 16),
                d_conv=_int(config, "conv_kernel", arch, 4), dt_rank=rank, d_inner=inner,
                eps=_eps(config, "layer_norm_epsilon", arch, 1e-5),
                bias=_bool(config, "use_bias", arch, False), conv_bias=_bool(config, "use_conv_bias", arch, True),
                tied=_bool(config, "tie_word_embeddings", arch, True),
                residual_in_fp32=_bool(config, "residual_in_fp32", arch, True))


def _b(v: bool) -> str:
    return "true" if v else "false"


def build_spec(s: dict, arch: str, bc_dt_norm: str = "") -> str:
    """The spec text; `bc_dt_norm` (FalconMamba) is inserted after the x_proj split."""
    return f"""# {arch} (transformers), written by seqc from config.json.
block {arch}Mixer(d_model, d_inner, d_state, d_conv, dt_rank) {{
  input h: [B, L, d_model]
  in_proj = linear(h, 2 * d_inner, bias = {_b(s['bias'])})
  x, z = split(in_proj, 2)
  conv1d = conv1d(x, kernel = d_conv, bias = {_b(s['conv_bias'])}, activation = silu)
  x_proj = linear(conv1d, dt_rank + 2 * d_state, bias = false)
  dt, Bt, Ct = split(x_proj, [dt_rank, d_state, d_state])
{bc_dt_norm}  dt_proj = linear(dt, d_inner, init = mamba_dt)
  y = selective_ssm(conv1d, delta = dt_proj, B = Bt, C = Ct, z = z, d_state = d_state) as self
  out_proj = linear(y, d_model, bias = {_b(s['bias'])})
  return out_proj
}}

block {arch}Block(d_model, d_inner, d_state, d_conv, dt_rank) {{
  input x: [B, L, d_model]
  norm = rmsnorm(x, eps = {s['eps']!r})
  mixer = {arch}Mixer(norm, d_model = d_model, d_inner = d_inner, d_state = d_state, d_conv = d_conv,
                      dt_rank = dt_rank)
  return x + mixer
}}

model {arch}(vocab = {s['vocab']}, d_model = {s['d_model']}, n_layers = {s['n_layers']}, d_inner = {s['d_inner']},
             d_state = {s['d_state']}, d_conv = {s['d_conv']}, dt_rank = {s['dt_rank']}) {{
  input tokens: [B, L] int
  embeddings = embedding(tokens, vocab = vocab, dim = d_model)
  x = repeat(n_layers) {arch}Block(embeddings, d_model = d_model, d_inner = d_inner, d_state = d_state,
                                   d_conv = d_conv, dt_rank = dt_rank) as layers
  norm_f = rmsnorm(x, eps = {s['eps']!r})
  lm_head = linear(norm_f, vocab, bias = false{', tie = embeddings' if s['tied'] else ''})
  return lm_head
}}
"""


def spec_for_config(config: dict) -> str:
    return build_spec(settings(config), ARCH)


def convert(state_dict: dict, config: dict, arch: str) -> dict:
    """Drop 'backbone.'; a tied head takes the embedding (refused if a stored head differs)."""
    import torch
    s = settings(config, arch)
    out = {(k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in state_dict.items()}
    if "embeddings.weight" not in out:
        raise SeqcError(f"{arch}: checkpoint has no 'backbone.embeddings.weight'")
    if s["tied"]:
        head = out.get("lm_head.weight")
        emb = out["embeddings.weight"]
        if head is not None and not (head.shape == emb.shape and torch.equal(torch.as_tensor(head),
                                                                              torch.as_tensor(emb))):
            raise SeqcError(f"{arch}: tie_word_embeddings is true but the checkpoint's 'lm_head.weight' differs "
                            f"from 'backbone.embeddings.weight'")
        out.pop("lm_head.weight", None)         # the spec's head reads embeddings.weight
    elif "lm_head.weight" not in out:
        raise SeqcError(f"{arch}: tie_word_embeddings is false but the checkpoint has no 'lm_head.weight'")
    return out


def convert_state_dict(state_dict: dict, config: dict) -> dict:
    return convert(state_dict, config, ARCH)


def check_dtype(config: dict, dtype, arch: str = ARCH) -> None:
    """residual_in_fp32 is exact only when the model runs in float32 or wider."""
    import torch
    if settings(config, arch)["residual_in_fp32"] and dtype in (torch.float16, torch.bfloat16):
        raise SeqcError(f"{arch}: residual_in_fp32 = true with a {str(dtype).replace('torch.', '')} model is "
                        f"not supported (seqc adds the residual in the model's dtype); load it as float32")
