"""Loading Hugging Face ``save_pretrained`` directories: ``from_pretrained``,
``spec_for`` and the ``seqc import`` command.

A directory holds ``config.json`` and its weights as ``model.safetensors``,
as shards listed by ``model.safetensors.index.json`` (``weight_map``: tensor
name -> shard file in the same directory), or as ``pytorch_model.bin``.  The
config's ``model_type`` picks the family module in ``seqc.interop.families``,
which writes the equivalent ``.seq`` spec (or refuses, naming the architecture
and the setting it cannot express) and renames the checkpoint's keys to the
spec's.  A single checkpoint file (no config) is read in mamba_ssm's layout,
as ``from_mamba_ssm`` does.

Every file is untrusted: the config must be a JSON object of bounded size;
shard names must be plain file names inside the directory; every safetensors
header is validated before a tensor is read (``load_checkpoint``); the
converted state_dict must have exactly the model's keys and shapes, and the
model must fit the memory limit, before the model is built.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..errors import SeqcError
from . import check_state_dict, load_checkpoint, match_shapes

MAX_CONFIG = 4 * 2 ** 20
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")



def _special_floats(obj: dict):
    """transformers writes non-finite floats into config.json as {"__float__": "Infinity"}."""
    if set(obj) == {"__float__"} and obj["__float__"] in ("Infinity", "-Infinity", "NaN"):
        return float(obj["__float__"].replace("Infinity", "inf"))
    return obj


def read_config(directory) -> dict:
    """config.json of a save_pretrained directory, as a dict."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise SeqcError(f"{directory} has no config.json (is it a save_pretrained directory?)")
    if os.path.getsize(path) > MAX_CONFIG:
        raise SeqcError(f"{path} is larger than {MAX_CONFIG} bytes; not a model config")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f, object_hook=_special_floats)
    except (ValueError, UnicodeDecodeError) as e:
        raise SeqcError(f"{path} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(config, dict):
        raise SeqcError(f"{path} does not hold a JSON object")
    return config


def family(config: dict, where: str = "config.json"):
    """The family module for config['model_type'] (a SeqcError naming an unknown one)."""
    from .families import FAMILIES, family_for
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise SeqcError(f"{where} has no 'model_type'; cannot tell which architecture it is")
    module = family_for(model_type)
    if module is None:
        known = ", ".join(sorted(FAMILIES)) or "none"
        raise SeqcError(f"{where}: model_type '{model_type[:80]}' is not supported by seqc "
                        f"(supported: {known})")
    return module


def _shard(directory, name, index_path):
    if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
        raise SeqcError(f"{index_path} names shard {str(name)[:80]!r}, which is not a plain file name "
                        f"in the same directory")
    return os.path.join(directory, name)


def read_weights(directory) -> dict:
    """The state_dict of a save_pretrained directory (all shards merged)."""
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        if os.path.getsize(index) > MAX_CONFIG * 16:
            raise SeqcError(f"{index} is too large to be a shard index")
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
        except (ValueError, UnicodeDecodeError, AttributeError):
            raise SeqcError(f"{index} is not a JSON object with a 'weight_map'") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise SeqcError(f"{index} has no 'weight_map' of tensor name -> shard file")
        sd: dict = {}
        for name in sorted(set(weight_map.values()), key=str):
            part = load_checkpoint(_shard(directory, name, index))
            listed = {k for k, v in weight_map.items() if v == name}
            if set(part) != listed:
                extra = sorted(set(part) ^ listed)[:3]
                raise SeqcError(f"shard {name} does not hold the tensors {index} lists for it "
                                f"(differs in {', '.join(repr(k[:80]) for k in extra)})")
            sd.update(part)
        return sd
    if os.path.isfile(single):
        return load_checkpoint(single)
    binary = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(binary):
        return load_checkpoint(binary)
    raise SeqcError(f"{directory} has config.json but no weights (expected one of {', '.join(_WEIGHTS)})")


def spec_for(path) -> str:
    """The .seq text equivalent to the model at `path` (a save_pretrained
    directory, or a mamba_ssm checkpoint file)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        config = read_config(path)
        return family(config, os.path.join(path, "config.json")).spec_for_config(config)
    from . import _strip, mamba_config, mamba_spec
    sd = check_state_dict(load_checkpoint(path))
    return mamba_spec(mamba_config(_strip(sd)))


def from_pretrained(path, dtype=None):
    """A compiled torch model holding the model at `path`: a Hugging Face
    save_pretrained directory (its family found by config.json's model_type)
    or a single mamba_ssm checkpoint file.  `dtype` (a torch dtype) overrides
    the checkpoint's floating dtype."""
    import torch

    path = os.fspath(path)
    if not os.path.exists(path):
        raise SeqcError(f"cannot read {path}: no such file or directory")
    if not os.path.isdir(path):
        from . import from_mamba_ssm
        return from_mamba_ssm(path, dtype=dtype)
    config = read_config(path)
    module = family(config, os.path.join(path, "config.json"))
    spec = module.spec_for_config(config)
    sd = module.convert_state_dict(check_state_dict(read_weights(path)), config)
    target = dtype or next((v.dtype for v in sd.values() if isinstance(v, torch.Tensor)), None)
    check = getattr(module, "check_dtype", None)
    if check is not None and target is not None:
        check(config, target)
    from ..analysis import build_graph
    from ..compiler import compile
    from ..memory import check_fits, estimate
    graph = build_graph(source=spec)
    what = f"seqc's {config['model_type']}"
    match_shapes(sd, graph.weight_shapes(), what)
    check_fits(estimate(graph, 1, 1, 4), flag=None)
    model = compile(graph, backend="torch")
    if target is not None:
        model = model.to(target)
    weights = {k: v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, np.float64)
               for k, v in sd.items()}
    return model.load_numpy(weights)
