"""The distribution ships every package, the grammar and the standard blocks."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT


def _declared():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    block = re.search(r"packages = \[(.*?)\]", text, re.S).group(1)
    return set(re.findall(r'"([\w.]+)"', block))


def test_every_python_package_is_declared():
    found = set()
    for base, mapped in (("seqc", "seqc"), ("backends", "seqc.backends")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            if "__pycache__" in dirpath or not any(f.endswith(".py") for f in files):
                continue
            rel = os.path.relpath(dirpath, os.path.join(ROOT, base))
            found.add(mapped if rel == "." else mapped + "." + rel.replace(os.sep, "."))
    assert found - _declared() == set()


def test_data_directories_are_declared():
    declared = _declared()
    assert {"seqc.grammar", "seqc.stdlib"} <= declared
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert '"seqc.grammar" = ["*.lark"]' in text and '"seqc.stdlib" = ["*.seq"]' in text


def test_readme_tour_compiles_and_matches_the_shipped_block():
    import numpy as np

    import seqc
    text = open(os.path.join(ROOT, "README.md")).read()
    tour = re.search(r"```seq\n(.*?)```", text, re.S).group(1)
    mine = seqc.compile(tour, backend="numpy")
    shipped = seqc.compile(os.path.join(ROOT, "examples", "mamba.seq"), backend="numpy")
    assert sorted(mine.weights) == sorted(shipped.weights)
    x = np.random.default_rng(0).standard_normal((2, 7, 64))
    np.testing.assert_allclose(mine(x, shipped.weights), shipped(x, shipped.weights), atol=1e-12)


def test_default_install_brings_the_fast_cpu_path_and_pins_agree():
    """numba (the CPU selective-scan kernels) is a default dependency, and every version pinned for CI
    satisfies the range pyproject declares for it (a pin outside its range would be a broken install)."""
    from packaging.requirements import Requirement
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    block = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
    deps = {r.name: r for r in (Requirement(s) for s in re.findall(r'"([^"]+)"', block))}
    assert "numba" in deps
    pins = dict(line.split("==") for line in open(os.path.join(ROOT, "requirements-ci.txt"))
                if "==" in line and not line.startswith("#"))
    for name, req in deps.items():
        assert name in pins, f"{name} is a dependency but not pinned for CI"
        assert req.specifier.contains(pins[name].strip()), (name, str(req.specifier), pins[name])


_NO_DYNAMO = r"""
import sys, torch, seqc
for spec, d in (("examples/lstm.seq", 32), ("examples/gru.seq", 32), ("examples/mamba.seq", 64),
                ("examples/s4d.seq", 64)):
    seqc.compile(spec)(torch.randn(1, 5, d)).sum().backward()
print("torch._dynamo" in sys.modules)
"""


def test_compiling_and_running_models_never_imports_dynamo():
    """Bug caught: a module-level ``@torch.compiler.disable`` (``outside_compile``, the LSTM/GRU kernel
    call) imported ``torch._dynamo`` with the torch backend -- seconds of every cold start that never
    uses torch.compile.  The decorators must be applied lazily."""
    p = subprocess.run([sys.executable, "-c", _NO_DYNAMO], capture_output=True, text=True, timeout=600,
                       cwd=str(ROOT))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split()[-1] == "False", p.stdout
