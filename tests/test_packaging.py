"""The distribution ships every package, the grammar and the standard blocks."""
from __future__ import annotations

import os
import re

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
