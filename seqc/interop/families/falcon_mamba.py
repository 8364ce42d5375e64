"""transformers' FalconMamba (``FalconMambaForCausalLM``, model_type
``falcon_mamba``): Mamba's layout and settings (see ``mamba.py``) plus
weightless RMS normalisations of dt, B and C after ``x_proj`` with eps
``mixer_rms_eps``, written with seqc's ``rms`` op (x / sqrt(mean(x^2) + eps),
no weight).  The normalisations hold no weights, so the checkpoint's keys are
Mamba's."""
from __future__ import annotations

from ...errors import SeqcError
from . import mamba

MODEL_TYPES = ("falcon_mamba",)
ARCH = "FalconMambaForCausalLM"


def spec_for_config(config: dict) -> str:
    s = mamba.settings(config, ARCH)
    eps = config.get("mixer_rms_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise SeqcError(f"{ARCH}: config 'mixer_rms_eps' must be a number in (0, 1), got {eps!r}")
    e = repr(float(eps))
    norms = (f"  dt = rms(dt, eps = {e})\n  Bt = rms(Bt, eps = {e})\n  Ct = rms(Ct, eps = {e})\n")
    return mamba.build_spec(s, ARCH, norms)


def convert_state_dict(state_dict: dict, config: dict) -> dict:
    return mamba.convert(state_dict, config, ARCH)


def check_dtype(config: dict, dtype) -> None:
    mamba.check_dtype(config, dtype, ARCH)
