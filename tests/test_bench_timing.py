"""``seqc bench`` times forward and forward+backward alike (interleaved rounds, the same
warm-up and repeats) and reports the spread (min / median / max)."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT
from seqc.benchmark import spread_ms


def test_spread_interleaves_with_the_same_warmup_and_repeats(monkeypatch):
    calls = []
    clock = iter(range(1000))
    monkeypatch.setattr("seqc.benchmark.time.perf_counter", lambda: next(clock) / 1e3)
    out = spread_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeat=4, warmup=2)
    assert calls == ["a", "b"] * 6                        # 2 warm-up rounds then 4 timed rounds, alternating
    # each timed call spans exactly one fake clock tick (1 ms)
    assert all(abs(v - 1.0) < 1e-9 for d in out.values() for v in d.values()) and set(out) == {"a", "b"}


def test_spread_reports_min_median_max():
    import time
    pauses = iter([0.0, 0.03, 0.0, 0.01, 0.0, 0.02])     # a: 0 / 0 / 0 ; b: 30 / 10 / 20 ms
    out = spread_ms({"a": lambda: None, "b": lambda: time.sleep(next(pauses, 0) or next(pauses, 0))},
                    repeat=3, warmup=0)
    assert out["b"]["min"] < out["b"]["median"] < out["b"]["max"]
    assert 9 < out["b"]["min"] < 15 and 19 < out["b"]["median"] < 26 and 29 < out["b"]["max"] < 45


def test_bench_table_shows_the_spread():
    out = subprocess.run([sys.executable, "-m", "seqc", "bench", os.path.join(ROOT, "examples", "lstm.seq"),
                          "-L", "8", "-B", "1", "--repeat", "3", "--steps", "2", "-p", "d_model=8", "-p", "hidden=8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    head, _, row = out.stdout.strip().splitlines()
    assert "forward ms median (min-max)" in head and "fwd+bwd ms median (min-max)" in head
    import re
    cells = re.findall(r"([\d.]+) \(([\d.]+)-([\d.]+)\)", row)
    assert len(cells) == 2
    for med, lo, hi in cells:
        assert float(lo) <= float(med) <= float(hi)
