"""Loading other projects' checkpoints into compiled seqc models.

``from_mamba_ssm(state_dict)`` reads the key layout of mamba_ssm (optionally
under ``backbone.``) and of mambapy (under ``mamba.``), infers the
configuration from tensor shapes, writes the matching .seq spec (numbers
only; the blocks come from seqc's standard library) and returns the compiled
torch model with the weights loaded.  ``load_checkpoint(path)`` reads
``.safetensors``, ``.pt`` and ``.bin`` files.
"""
from __future__ import annotations

import os
import re

import numpy as np

from ..errors import SeqcError

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_PREFIXES = ("backbone.", "mamba.", "model.")


def load_checkpoint(path) -> dict:
    """A state_dict from a .safetensors, .pt or .bin file (tensors only, no pickled code)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SeqcError(f"cannot read checkpoint {path}: no such file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise SeqcError("reading .safetensors needs the 'safetensors' package (pip install seqc[io])") from None
        return load_file(path)
    import torch
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise SeqcError(f"cannot read checkpoint {path}: {e}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SeqcError(f"{path} does not hold a state_dict")
    return obj


def _strip(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def _shape(sd, key):
    if key not in sd:
        raise SeqcError(f"checkpoint has no '{key}' (is this a Mamba checkpoint?)")
    return tuple(sd[key].shape)


def mamba_config(state_dict: dict) -> dict:
    """d_model, n_layers, d_state, d_conv, dt_rank, d_inner, vocab (or None) from tensor shapes."""
    sd = _strip(state_dict)
    layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER.match(k))})
    if not layers:
        raise SeqcError("checkpoint has no 'layers.{i}.' keys (is this a Mamba checkpoint?)")
    if layers != list(range(len(layers))):
        raise SeqcError(f"checkpoint layers are not numbered 0..{len(layers) - 1}: {layers[:8]}")
    two_inner, d_model = _shape(sd, "layers.0.mixer.in_proj.weight")
    d_inner, d_state = _shape(sd, "layers.0.mixer.A_log")
    if two_inner != 2 * d_inner:
        raise SeqcError(f"in_proj has {two_inner} outputs but A_log says d_inner = {d_inner}")
    cfg = dict(d_model=d_model, n_layers=len(layers), d_state=d_state, d_inner=d_inner,
               d_conv=_shape(sd, "layers.0.mixer.conv1d.weight")[-1],
               dt_rank=_shape(sd, "layers.0.mixer.dt_proj.weight")[1],
               vocab=_shape(sd, "embedding.weight")[0] if "embedding.weight" in sd else None)
    for extra in ("in_proj.bias", "out_proj.bias"):
        if f"layers.0.mixer.{extra}" in sd:
            raise SeqcError(f"checkpoint has 'mixer.{extra}'; seqc's Mamba block uses bias-free projections")
    return cfg


def mamba_spec(cfg: dict) -> str:
    """The .seq source of a Mamba stack (or LM when cfg['vocab']) with these numbers."""
    c = {k: int(v) for k, v in cfg.items() if v is not None}
    block = ("MambaBlock({x}, d_model = d_model, d_state = d_state, d_conv = d_conv, dt_rank = dt_rank, "
             "d_inner = d_inner)")
    head = (f"model MambaCheckpoint(d_model = {c['d_model']}, n_layers = {c['n_layers']}, d_state = {c['d_state']}, "
            f"d_conv = {c['d_conv']}, dt_rank = {c['dt_rank']}, d_inner = {c['d_inner']}")
    if cfg.get("vocab") is None:
        return (f'include "std/mamba_block.seq"\n\n{head}) {{\n  input x: [B, L, d_model]\n'
                f"  x = repeat(n_layers) {block.format(x='x')} as layers\n  return x\n}}\n")
    return (f'include "std/mamba_block.seq"\n\n{head}, vocab = {c["vocab"]}) {{\n'
            f"  input tokens: [B, L] int\n  embedding = embedding(tokens, vocab = vocab, dim = d_model)\n"
            f"  x = repeat(n_layers) {block.format(x='embedding')} as layers\n"
            f"  norm_f = rmsnorm(x)\n  lm_head = linear(norm_f, vocab, bias = false)\n  return lm_head\n}}\n")


def from_mamba_ssm(state_dict, dtype=None):
    """A torch-backend compiled model holding a mamba_ssm / mambapy checkpoint (CONTRACT).

    ``state_dict`` may also be a path to a .safetensors / .pt / .bin file.  A
    language-model checkpoint without ``lm_head.weight`` ties it to the
    embedding, as mamba_ssm does.  Missing ``norm_f.weight`` is an error for
    LM checkpoints.
    """
    import torch

    from ..compiler import compile

    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = load_checkpoint(state_dict)
    sd = _strip(state_dict)
    cfg = mamba_config(sd)
    if cfg["vocab"] is not None:
        if "norm_f.weight" not in sd:
            raise SeqcError("language-model checkpoint has 'embedding.weight' but no 'norm_f.weight'")
        sd.setdefault("lm_head.weight", sd["embedding.weight"])
    model = compile(mamba_spec(cfg), backend="torch")
    own = model.state_dict()
    unexpected = sorted(set(sd) - set(own))
    if unexpected:
        raise SeqcError(f"checkpoint has {len(unexpected)} key(s) seqc's Mamba does not, e.g. '{unexpected[0]}'")
    first = next(iter(state_dict.values()))
    target = dtype or (first.dtype if isinstance(first, torch.Tensor) and first.is_floating_point() else None)
    if target is not None:
        model = model.to(target)
    weights = {k: v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
               for k, v in sd.items()}
    return model.load_numpy(weights)
