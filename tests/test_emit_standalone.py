"""``seqc emit`` prints a file that runs on its own: executed in a fresh namespace (only
what it imports), its ``build(program)`` gives a model that, with the compiled model's
weights, computes the same outputs, states and steps as ``seqc.compile``."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import seqc
from conftest import ROOT
from seqc.compiler import plan_graph
from seqc.lower import lower


@pytest.mark.parametrize("name, params", [("lstm.seq", None),
                                          ("mamba.seq", {"d_model": 16, "n_layers": 1}),
                                          ("s4d.seq", {"d_model": 4, "d_state": 4}),
                                          ("transformer.seq", None)])
def test_emitted_source_runs_on_its_own(name, params):
    path = os.path.join(ROOT, "examples", name)
    argv = [sys.executable, "-m", "seqc", "emit", path]
    for k, v in (params or {}).items():
        argv += ["-p", f"{k}={v}"]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    source = out.stdout
    assert source.lstrip().startswith('"""') and "\nfrom seqc.backends.torch.module import SeqcModule, run\n" in source
    ns = {}
    exec(compile(source, f"<emitted {name}>", "exec"), ns)      # noqa: S102 - the test runs seqc's own output
    program = lower(plan_graph(path, "torch", params))
    model = ns["build"](program)
    ref = seqc.compile(path, params=params)
    model.load_state_dict(ref.state_dict())
    import numpy as np
    from seqc.inputs import random_inputs
    (x,) = (torch.as_tensor(a) for a in random_inputs(ref.graph, 2, 5, np.random.default_rng(0)))
    x = x if not x.is_floating_point() else x.float()
    with torch.no_grad():
        y, s = model(x, return_state=True)
        y_ref, s_ref = ref(x, return_state=True)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        step, _ = model.step(x[:, 0], state=s)
        step_ref, _ = ref.step(x[:, 0], state=s_ref)
        torch.testing.assert_close(step, step_ref, rtol=1e-5, atol=1e-6)
    assert type(model).__name__ == type(ref).__name__ and type(model) is not type(ref)
