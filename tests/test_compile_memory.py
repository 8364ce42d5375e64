"""``seqc.compile`` from Python checks the memory estimate before the backend allocates
any weight, as ``seqc run`` does (a SeqcError naming SEQC_MAX_MEMORY, never an
out-of-memory crash half-way through building)."""
from __future__ import annotations

import pytest

import seqc
from seqc import SeqcError

SPEC = "model M(d = 64) {\n  input x: [B, L, d]\n  y = linear(x, out = d)\n  return y\n}"


@pytest.fixture
def no_build(monkeypatch):
    from seqc.backend import get_backend
    be = type(get_backend("torch"))

    def refuse(*a, **k):
        raise AssertionError("the backend allocated before the memory check")
    monkeypatch.setattr(be, "build", refuse)


def test_weights_over_the_limit_are_refused_before_allocation(monkeypatch, no_build):
    # d = 1024: 1024*1024 + 1024 float32 weights = 4.0 MiB > 1 MiB
    monkeypatch.setenv("SEQC_MAX_MEMORY", str(1 << 20))
    with pytest.raises(SeqcError, match=r"needs about 4.0 MiB \(weights 4.0 MiB, activations 0 B.*SEQC_MAX_MEMORY"):
        seqc.compile(source=SPEC, params={"d": 1024})


def test_activations_count_when_the_length_is_fixed(monkeypatch, no_build):
    monkeypatch.setenv("SEQC_MAX_MEMORY", str(1 << 20))
    with pytest.raises(SeqcError, match=r"activations .* at batch 64, length 100000"):
        seqc.compile(source=SPEC, length=100000, batch=64)


def test_a_model_that_fits_builds(monkeypatch):
    monkeypatch.setenv("SEQC_MAX_MEMORY", str(1 << 20))
    m = seqc.compile(source=SPEC)                      # 16.2 KiB of weights, no length: activations not counted
    assert sum(p.numel() for p in m.parameters()) == 64 * 64 + 64
    m64 = seqc.compile(source=SPEC, dtype="float64", params={"d": 300})     # 90,300 x 8 B = 705 KiB < 1 MiB
    assert next(m64.parameters()).dtype.itemsize == 8
    with pytest.raises(SeqcError, match="weights 1.0 MiB"):                  # 131,328 x 8 B > 1 MiB
        seqc.compile(source=SPEC, dtype="float64", params={"d": 362})
