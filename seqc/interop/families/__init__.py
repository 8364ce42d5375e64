"""Hugging Face model families that ``seqc.interop.from_pretrained`` can load.

One module per family, each exposing ``MODEL_TYPES`` (the ``model_type``
values of ``config.json`` it handles), ``spec_for_config(config) -> str`` (the
``.seq`` text of the equivalent model; a ``SeqcError`` naming the architecture
and the setting it cannot express) and ``convert_state_dict(state_dict,
config) -> dict`` (checkpoint keys renamed to the spec's ``state_dict`` keys).
Every module here is imported on first use, so a new family is a new file.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

FAMILIES: dict[str, ModuleType] = {}


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for model_type in getattr(module, "MODEL_TYPES", ()):
            FAMILIES[model_type] = module


_discover()


def family_for(model_type: str) -> ModuleType | None:
    """The module that handles a config's ``model_type``, or None."""
    return FAMILIES.get(model_type)
