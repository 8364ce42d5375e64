"""Which plan runs is visible: ``explain`` lists every layer with a plan (single-plan
LSTM / attention layers included), a forced ``mode`` that a layer cannot run is a
located warning naming the layer, and ``model.last_plans()`` reports every layer's plan."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import seqc
from conftest import ROOT
from seqc import SeqcWarning


def example(name):
    return os.path.join(ROOT, "examples", name)


def cli(*argv):
    return subprocess.run([sys.executable, "-m", "seqc", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_explain_lists_lstm_and_attention_layers_with_their_plan():
    out = cli("explain", example("hybrid.seq"))
    assert out.returncode == 0, out.stderr
    for name in ("layers.0.attn.attn", "layers.1.attn.attn"):
        assert f"{name}: attention [heads=4]\n  plan: recurrent (the only plan attention has" in out.stdout
    out = cli("explain", example("lstm.seq"))
    assert "lstm: lstm [hidden=64, layers=1]\n  plan: recurrent (the only plan lstm has" in out.stdout


def test_mode_conv_on_a_selective_ssm_is_a_located_warning_naming_the_layer():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = seqc.compile(path=example("mamba.seq"), params={"n_layers": 1, "d_model": 16}, mode="conv")
    msgs = [w.message for w in caught if isinstance(w.message, SeqcWarning)]
    assert len(msgs) == 1, [str(w.message) for w in caught]
    text = str(msgs[0])
    assert text.startswith("std/mamba_block.seq:") and "selective_ssm layer 'layers.0.mixer'" in text
    assert "mode=conv cannot apply" in text and "no convolution kernel" in text
    assert m.last_plans() == {"layers.0.mixer": "scan"}
    # a mode every layer can run, and the default, warn about nothing
    for mode in ("auto", "scan", "recurrent"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seqc.compile(path=example("mamba.seq"), params={"n_layers": 1, "d_model": 16}, mode=mode)
        assert not [w for w in caught if isinstance(w.message, SeqcWarning)], mode
    out = cli("run", "--mode", "conv", "-p", "n_layers=1", "-p", "d_model=16", "-L", "8", example("mamba.seq"))
    assert out.returncode == 0 and "warning: mode=conv cannot apply to selective_ssm layer 'layers.0.mixer'" \
        in out.stderr, out.stderr


def test_conv_mode_on_s4d_does_not_warn():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = seqc.compile(path=example("s4d.seq"), params={"d_model": 4, "d_state": 4}, mode="conv")
    assert not [w for w in caught if isinstance(w.message, SeqcWarning)]
    assert m.last_plans() == {"ssm": "conv"}


def test_last_plans_reports_every_planned_layer_and_the_per_call_choice():
    hybrid = seqc.compile(path=example("hybrid.seq"))
    assert hybrid.last_plans() == {"layers.0.mamba.mixer": "scan", "layers.0.attn.attn": "recurrent",
                                   "layers.1.mamba.mixer": "scan", "layers.1.attn.attn": "recurrent"}
    s4d = seqc.compile(path=example("s4d.seq"))              # d_model = d_state = 64
    assert s4d.last_plans() == {"ssm": None}                 # chosen per call: nothing has run yet
    s4d(torch.randn(1, 8, 64)).sum().backward()               # training: the choice depends on the length
    short = s4d.last_plans()["ssm"]
    s4d(torch.randn(1, 1 << 14, 64)).sum().backward()
    long = s4d.last_plans()["ssm"]
    assert (short, long) == ("scan", "conv")
    with torch.no_grad():                                     # inference: the kernel at every length
        s4d(torch.randn(1, 1 << 14, 64))
        assert s4d.last_plans()["ssm"] == "scan"
    lstm = seqc.compile(path=example("lstm.seq"))
    assert lstm.last_plans() == {"lstm": "recurrent"}


@pytest.mark.parametrize("name", ["gru.seq", "transformer.seq"])
def test_last_plans_keys_are_the_layers_explain_lists(name):
    m = seqc.compile(path=example(name))
    out = cli("explain", example(name)).stdout
    listed = [line.split(":")[0] for line in out.splitlines() if line and not line.startswith(" ")
              and ": " in line and not line.startswith(("plans for", "machine model", "memory estimate"))]
    assert listed == list(m.last_plans()) and listed
