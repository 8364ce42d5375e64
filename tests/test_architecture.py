"""The README's architecture picture is generated from the code and kept current."""
from __future__ import annotations

import os

from conftest import ROOT

from seqc import architecture
from seqc.passes import Pipeline


def test_checked_in_picture_is_current():
    """docs/architecture.dot is exactly what the code generates now (regenerate with
    `python -m seqc.architecture --dot docs/architecture.dot --svg docs/architecture.svg`)."""
    with open(os.path.join(ROOT, "docs", "architecture.dot"), encoding="utf-8") as f:
        assert f.read() == architecture.pipeline_dot()


def test_picture_follows_the_live_tables():
    """Every pass of the default pipeline, every op family and every backend appears, in order."""
    from seqc import backend, ops
    dot = architecture.pipeline_dot()
    positions = [dot.index(f'label="{name}"') for name in Pipeline().names]
    assert positions == sorted(positions)
    for family in ops.FAMILIES:
        assert family in dot
    for name in backend.backend_names():
        assert f"be_{name} " in dot and f"lower -> be_{name};" in dot
