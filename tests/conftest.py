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
    """A tensor or array as float64 numpy (complex128 for complex values: both parts compared)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        return x.resolve_conj().numpy().astype(np.complex128) if x.is_complex() else x.double().numpy()
    return np.asarray(x)


def assert_agree(a, b, tol: float, what: str = ""):
    """Two results agree: same shape, then max |a - b| <= tol * max(1, |a|)."""
    a, b = to_numpy(a), to_numpy(b)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    scale = max(1.0, float(np.abs(a).max(initial=0)))
    err = float(np.abs(a - b).max(initial=0))
    assert err <= tol * scale, f"{what}: max |diff| {err:.3g} > {tol:g} * {scale:.3g}"


def filecheck(text: str, checks: str) -> None:
    """LLVM FileCheck, reduced: each non-blank line of `checks` is matched, in order, on
    a later line of `text` (``CHECK-NEXT:`` on the very next line).  ``[[X:regex]]``
    binds X to what the regex matched, ``[[X]]`` must then match the same text, so IR
    dumps are compared by structure and never by node id; ``{{regex}}`` is an
    anonymous regex.  Everything else matches literally."""
    import re as _re
    lines = text.splitlines()
    bound: dict[str, str] = {}
    at = -1
    for check in (c.strip() for c in checks.strip().splitlines()):
        if not check:
            continue
        nxt = check.startswith("CHECK-NEXT:")
        body = check.split(":", 1)[1].strip() if check.startswith(("CHECK:", "CHECK-NEXT:")) else check
        pattern, names = "", []
        for part in _re.split(r"(\[\[\w+(?::[^\]]+)?\]\]|\{\{.+?\}\})", body):
            if part.startswith("[[") and ":" in part:
                name, rx = part[2:-2].split(":", 1)
                pattern += f"(?P<{name}>{rx})"
                names.append(name)
            elif part.startswith("[["):
                name = part[2:-2]
                assert name in bound, f"[[{name}]] used before it is bound: {check}"
                pattern += _re.escape(bound[name])
            elif part.startswith("{{"):
                pattern += f"(?:{part[2:-2]})"
            else:
                pattern += _re.escape(part)
        rx = _re.compile(pattern)
        candidates = [at + 1] if nxt else range(at + 1, len(lines))
        for i in candidates:
            m = rx.search(lines[i]) if i < len(lines) else None
            if m:
                bound.update({n: m.group(n) for n in names})
                at = i
                break
        else:
            where = lines[at] if at >= 0 else "<start>"
            raise AssertionError(f"{check!r} not found after line {at + 1} ({where!r}) in:\n{text}")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
