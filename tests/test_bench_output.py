"""Benchmarks never overwrite the committed results by default: they write to a
temporary directory, to ``--out DIR``, and into benchmarks/results/ only with ``--save``."""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def common(monkeypatch, tmp_path):
    sys.path.insert(0, ROOT)
    from benchmarks import common as c
    monkeypatch.setattr(c, "RESULTS", str(tmp_path / "committed"))
    monkeypatch.setattr(c, "_OUT", [None])
    monkeypatch.setattr(c.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    yield c
    sys.path.remove(ROOT)


def parse(c, *argv):
    ap = argparse.ArgumentParser()
    c.add_output_options(ap)
    return c.set_output(ap.parse_args(list(argv)))


def test_default_is_a_temporary_directory(common, tmp_path):
    path = common.save("x.json", {"a": 1})
    assert path == str(tmp_path / "tmp" / "seqc-benchmarks" / "x.json")
    assert not (tmp_path / "committed").exists()
    assert parse(common) == str(tmp_path / "tmp" / "seqc-benchmarks")


def test_save_and_out(common, tmp_path):
    assert parse(common, "--out", str(tmp_path / "mine")) == str(tmp_path / "mine")
    assert common.save("x.json", {}) == str(tmp_path / "mine" / "x.json")
    assert parse(common, "--save") == str(tmp_path / "committed")
    assert common.save("x.json", {}) == str(tmp_path / "committed" / "x.json")
    with pytest.raises(SystemExit, match="not both"):
        parse(common, "--save", "--out", "d")


def test_a_benchmark_run_leaves_the_committed_results_alone(tmp_path):
    committed = os.path.join(ROOT, "benchmarks", "results", "plans.json")
    before = digest(committed)
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_plans", "--lengths", "16", "--repeat", "1"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"wrote {tmp_path}/seqc-benchmarks/plans.json" in out.stdout
    assert digest(committed) == before
