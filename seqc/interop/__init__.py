"""Loading other projects' checkpoints into compiled seqc models.

``from_pretrained(path)`` and ``spec_for(path)`` (``seqc.interop.pretrained``) read
Hugging Face save_pretrained directories, one family module per model_type
in ``seqc.interop.families``.  ``from_mamba_ssm(state_dict)`` reads the key layout of mamba_ssm (optionally
under ``backbone.``) and of mambapy (under ``mamba.``), infers the
configuration from tensor shapes, writes the matching .seq spec (numbers
only; the blocks come from seqc's standard library) and returns the compiled
torch model with the weights loaded.  ``load_checkpoint(path)`` reads
``.safetensors``, ``.pt`` and ``.bin`` files.

Checkpoints are untrusted input: pickles load with ``weights_only=True``; a
safetensors header is validated (sizes, offsets, dtypes) before any tensor is
read; every value must be a real floating tensor on a real device, keyed by a
string; the configuration inferred from the shapes is elaborated and every
tensor's shape compared with the model's, and the model's memory checked
against SEQC_MAX_MEMORY, before anything is allocated.  Keys the model does not
have are refused by name, never ignored.
"""
from __future__ import annotations

import json
import os
import re
import stat
import struct

import numpy as np

from ..errors import SeqcError
from ..limits import how_to_raise, limit

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_PREFIXES = ("backbone.", "mamba.", "model.")


_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER = 100 * 2 ** 20


def safetensors_header(path) -> dict:
    """The validated header of a .safetensors file {name: (dtype, shape)}, read
    without reading (or allocating) any tensor: the declared sizes must match
    the offsets and fit in the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SeqcError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise SeqcError(f"{path} is not a valid safetensors file (header length {n} but the file has "
                            f"{size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise SeqcError(f"{path} is not a valid safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise SeqcError(f"{path} is not a valid safetensors file (header is not a JSON object)")
    data = size - 8 - n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (dtype in _ST_DTYPES and isinstance(shape, list) and len(shape) <= 8
                  and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 48 for d in shape)
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in (a, b)))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise SeqcError(f"{path}: malformed safetensors entry for tensor {name[:80]!r}")
        nbytes = int(np.prod(shape, dtype=object)) * _ST_DTYPES[dtype]
        if not (0 <= a <= b <= data) or b - a != nbytes:
            raise SeqcError(f"{path}: tensor {name[:80]!r} declares shape {tuple(shape)} ({nbytes:,} bytes of "
                            f"{dtype}) but its data is {b - a:,} bytes at offsets {a}..{b} of a {data:,}-byte "
                            f"data section (truncated or corrupt file)")
        out[name] = (dtype, tuple(shape))
    return out


def load_checkpoint(path) -> dict:
    """A state_dict from a .safetensors, .pt or .bin file (tensors only, no pickled code)."""
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise SeqcError(f"cannot read checkpoint {path}: {(e.strerror or 'no such file').lower()}") from None
    if not stat.S_ISREG(mode):
        raise SeqcError(f"cannot read checkpoint {path}: not a regular file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise SeqcError("reading .safetensors needs the 'safetensors' package (pip install seqc[io])") from None
        header = safetensors_header(path)
        total = sum(int(np.prod(s, dtype=object)) * _ST_DTYPES[d] for d, s in header.values())
        if total > limit("SEQC_MAX_MEMORY"):
            raise SeqcError(f"{path} holds {total:,} bytes of tensors, more than the limit "
                            f"({how_to_raise('SEQC_MAX_MEMORY')})")
        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends: a bad file is the user's to fix
            raise SeqcError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e)[:200]}") from None
    import torch
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise SeqcError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e)[:200]}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SeqcError(f"{path} does not hold a state_dict")
    return obj


def check_state_dict(sd) -> dict:
    """`sd` is a mapping of str keys to real floating tensors / arrays on a real
    device; anything else is a SeqcError naming the key."""
    import torch
    if not isinstance(sd, dict):
        try:
            sd = dict(sd)
        except (TypeError, ValueError):
            raise SeqcError(f"expected a state_dict (a dict of name -> tensor), got {type(sd).__name__}") from None
    if not sd:
        raise SeqcError("the state_dict is empty")
    for k, v in sd.items():
        if not isinstance(k, str):
            raise SeqcError(f"state_dict keys must be strings, got {k!r} ({type(k).__name__})")
        if isinstance(v, torch.Tensor):
            if v.is_meta or v.device.type == "meta":
                raise SeqcError(f"'{k}' is a meta tensor (no data); load the checkpoint with real weights")
            if not v.is_floating_point():
                raise SeqcError(f"'{k}' holds {v.dtype} values; checkpoint weights must be real floating point")
        elif isinstance(v, np.ndarray):
            if v.dtype.kind != "f":
                raise SeqcError(f"'{k}' holds {v.dtype} values; checkpoint weights must be real floating point")
        else:
            raise SeqcError(f"'{k}' is a {type(v).__name__}, not a tensor")
    return sd


def _strip(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def _shape(sd, key, rank=None):
    if key not in sd:
        raise SeqcError(f"checkpoint has no '{key}' (is this a Mamba checkpoint?)")
    shape = tuple(int(d) for d in sd[key].shape)
    if rank is not None and len(shape) != rank:
        raise SeqcError(f"checkpoint '{key}' has shape {shape}; a Mamba checkpoint has {rank} dimensions there")
    if any(d < 1 for d in shape):
        raise SeqcError(f"checkpoint '{key}' has an empty shape {shape}")
    return shape


def match_shapes(sd: dict, want: dict, what: str) -> None:
    """Every key of the model present with its shape, and no key the model lacks
    (named, never ignored)."""
    unexpected = sorted(set(sd) - set(want))
    if unexpected:
        shown = ", ".join(f"'{k[:80]}'" for k in unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise SeqcError(f"checkpoint has {len(unexpected)} key(s) {what} does not: {shown}")
    missing = sorted(set(want) - set(sd))
    if missing:
        raise SeqcError(f"checkpoint lacks {len(missing)} key(s) of {what}: "
                        + ", ".join(f"'{k}'" for k in missing[:5]) + (" ..." if len(missing) > 5 else ""))
    for k, shape in want.items():
        got = tuple(int(d) for d in sd[k].shape)
        if got != tuple(shape):
            raise SeqcError(f"checkpoint '{k}' has shape {got}, but {what} with this configuration needs "
                            f"{tuple(shape)}")


def mamba_config(state_dict: dict) -> dict:
    """d_model, n_layers, d_state, d_conv, dt_rank, d_inner, vocab (or None) from tensor shapes."""
    sd = _strip(state_dict)
    layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER.match(k))})
    if not layers:
        raise SeqcError("checkpoint has no 'layers.{i}.' keys (is this a Mamba checkpoint?)")
    if layers != list(range(len(layers))):
        raise SeqcError(f"checkpoint layers are not numbered 0..{len(layers) - 1}: {layers[:8]}")
    two_inner, d_model = _shape(sd, "layers.0.mixer.in_proj.weight", 2)
    d_inner, d_state = _shape(sd, "layers.0.mixer.A_log", 2)
    if two_inner != 2 * d_inner:
        raise SeqcError(f"in_proj has {two_inner} outputs but A_log says d_inner = {d_inner}")
    cfg = dict(d_model=d_model, n_layers=len(layers), d_state=d_state, d_inner=d_inner,
               d_conv=_shape(sd, "layers.0.mixer.conv1d.weight", 3)[-1],
               dt_rank=_shape(sd, "layers.0.mixer.dt_proj.weight", 2)[1],
               vocab=_shape(sd, "embedding.weight", 2)[0] if "embedding.weight" in sd else None)
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
    """A torch-backend compiled model holding a mamba_ssm / mambapy checkpoint.

    ``state_dict`` may also be a path to a .safetensors / .pt / .bin file.  A
    language-model checkpoint without ``lm_head.weight`` ties it to the
    embedding, as mamba_ssm does.  Missing ``norm_f.weight`` is an error for
    LM checkpoints.
    """
    import torch

    from ..compiler import compile

    from ..analysis import build_graph
    from ..memory import check_fits, estimate

    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = load_checkpoint(state_dict)
    state_dict = check_state_dict(state_dict)
    sd = _strip(state_dict)
    cfg = mamba_config(sd)
    if cfg["vocab"] is not None:
        if "norm_f.weight" not in sd:
            raise SeqcError("language-model checkpoint has 'embedding.weight' but no 'norm_f.weight'")
        sd.setdefault("lm_head.weight", sd["embedding.weight"])
    # shapes and memory from the IR alone, before the model (and its weights) exist
    graph = build_graph(mamba_spec(cfg))
    match_shapes(sd, graph.weight_shapes(), "seqc's Mamba")
    check_fits(estimate(graph, 1, 1, 4), flag=None)
    model = compile(graph, backend="torch")
    first = next(iter(state_dict.values()))
    target = dtype or (first.dtype if isinstance(first, torch.Tensor) and first.is_floating_point() else None)
    if target is not None:
        model = model.to(target)
    weights = {k: v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
               for k, v in sd.items()}
    return model.load_numpy(weights)


from .pretrained import from_pretrained, spec_for  # noqa: E402  (uses the readers above)
