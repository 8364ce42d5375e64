"""docs/language.md is generated from the op registry and kept current; `seqc ops`."""
from __future__ import annotations

import os

import pytest

import seqc
from seqc.cli import main
from seqc.ops import OPS
from seqc.reference import describe, markdown

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "language.md")


def test_checked_in_reference_is_current():
    with open(DOC, encoding="utf-8") as f:
        checked_in = f.read()
    assert checked_in == markdown(), ("docs/language.md is stale: regenerate it with "
                                      "`python -m seqc ops --markdown > docs/language.md`")


def test_every_op_and_attribute_is_documented():
    text = markdown()
    for name, spec in OPS.items():
        entry = describe(name)
        assert f"### `{name}`" in text and entry in text
        for a in spec.attrs:
            assert f"| `{a.name}` | {a.type} |" in entry
    lin = describe("linear")
    assert "`linear(x, out, bias = true, init = default" in lin
    assert "`weight` (12, 8), `bias` (12,)" in lin                  # from linear's own weight-shape rule
    assert "`h` (1, 12), `c` (1, 12)" in describe("lstm")
    assert "| `kernel` | int | 4 | > 0, <= 4096 |" in describe("conv1d")


def test_ops_command(capsys):
    assert main(["ops", "rmsnorm"]) == 0
    assert capsys.readouterr().out == describe("rmsnorm")
    assert main(["ops"]) == 0
    assert "selective_ssm(u, delta, B, C, z?, d_state = 16" in capsys.readouterr().out
    assert main(["ops", "--markdown"]) == 0
    assert capsys.readouterr().out == markdown()
    assert main(["ops", "lstn"]) == 2
    assert "unknown op 'lstn' (did you mean 'lstm'?)" in capsys.readouterr().err
    with pytest.raises(seqc.SeqcError):
        describe("nope")
