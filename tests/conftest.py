"""Shared test helpers: paths, the example list, and one assertion that two
backends agree (shape, dtype class, then values)."""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import tempfile

from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

# No example database, and hypothesis's other caches in the temp directory: property
# tests never write .hypothesis/ into the working directory.
settings.register_profile("seqc", database=None)
settings.load_profile("seqc")
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), f"seqc-hypothesis-{os.getuid()}"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.seq")))


def example(name: str) -> str:
    return os.path.join(ROOT, "examples", name)


def to_numpy(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().double().numpy()
    return np.asarray(x)


def assert_agree(a, b, tol: float, what: str = ""):
    """Two results agree: same shape, then max |a - b| <= tol * max(1, |a|)."""
    a, b = to_numpy(a), to_numpy(b)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    scale = max(1.0, float(np.abs(a).max(initial=0)))
    err = float(np.abs(a - b).max(initial=0))
    assert err <= tol * scale, f"{what}: max |diff| {err:.3g} > {tol:g} * {scale:.3g}"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
