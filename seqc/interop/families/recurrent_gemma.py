"""RecurrentGemma (Griffin / Hawk, transformers' ``recurrent_gemma``): refused by name.

seqc expresses RecurrentGemma's recurrent (temporal) block exactly - the
``rglru`` op and ``std/griffin_block.seq`` use transformers'
``RecurrentGemmaRecurrentBlock`` layer names, so a block's weights load
unchanged - but not yet the whole model, whose other pieces need:

* the embedding scaled by ``sqrt(hidden_size)`` (rounded to bfloat16) and the
  logits soft-cap ``tanh(logits / cap) * cap`` (scalar-by-tensor arithmetic);
* the local attention blocks (``block_types`` "attention"): sliding-window
  attention with partial rotary embeddings and grouped key/value heads;
* the head tied to the embedding.

Both functions raise a SeqcError naming what is missing for the given config,
so ``from_pretrained`` never builds a model that computes something else.
"""
from __future__ import annotations

from ...errors import SeqcError

MODEL_TYPES = ("recurrent_gemma",)


def _missing(config: dict) -> list[str]:
    missing = [f"the embedding scale sqrt(hidden_size) and the logits soft-cap "
               f"tanh(logits / {config.get('logits_soft_cap', 30.0)}) * cap"]
    types = list(config.get("block_types") or ("recurrent", "recurrent", "attention"))
    layers = (types * 100)[:config.get("num_hidden_layers", len(types))]   # transformers' layers_block_type
    if "attention" in layers:
        missing.append(f"local attention blocks (sliding window {config.get('attention_window_size', 2048)}, "
                       f"partial rotary embeddings, {config.get('num_key_value_heads', 1)} key/value heads)")
    missing.append("the head tied to the embedding")
    return missing


def _refuse(config: dict):
    raise SeqcError("cannot express RecurrentGemma (model_type 'recurrent_gemma') yet: it needs "
                    + "; ".join(_missing(config))
                    + ". Its recurrent block is available as GriffinRecurrent in std/griffin_block.seq.")


def spec_for_config(config: dict) -> str:
    _refuse(config)


def convert_state_dict(state_dict: dict, config: dict) -> dict:
    _refuse(config)
