"""The backend interface and the lowered program: the registry, machine models
from the backends, compile-time plan threshold tables (and a runtime that never
imports the passes), fusion regions carried to the layers, one program for the
module tree and the generated code."""
from __future__ import annotations

import ast
import glob
import os
import random
import sys

import numpy as np
import pytest
import torch

import seqc
from seqc.backend import Backend, backend_names, get_backend, register_backend
from seqc.compiler import plan_graph
from seqc.lower import lower

from conftest import ROOT, assert_agree, example


def test_registry_names_and_errors():
    assert {"numpy", "torch", "triton"} <= set(backend_names())
    assert get_backend("numpy").name == "numpy" and not get_backend("numpy").autograd
    assert get_backend("torch").autograd
    with pytest.raises(seqc.SeqcError, match="did you mean 'numpy'"):
        get_backend("nunpy")
    # triton is registered; where it cannot run (no triton, neither CUDA nor TRITON_INTERPRET=1) it says why
    triton = get_backend("triton", check=False)
    if triton.available() is not None:
        assert "triton" in triton.available()
        with pytest.raises(seqc.SeqcError, match="triton backend needs"):
            seqc.compile(example("s4d.seq"), backend="triton")
    with pytest.raises(seqc.SeqcError, match="runs on cpu"):
        seqc.compile(example("s4d.seq"), backend="numpy", device="cuda")
    with pytest.raises(seqc.SeqcError, match="unknown device"):
        seqc.compile(example("s4d.seq"), device="tpu")


# every compiler module; seqc/discretization.py names printer targets (numpy / torch source), not backends
OWNED = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "seqc", "**", "*.py"), recursive=True)
               if os.path.basename(p) != "discretization.py")


@pytest.mark.parametrize("path", OWNED)
def test_no_backend_name_branches_outside_the_backends(path):
    """Dispatch goes through the registry: no `backend == "numpy"` comparisons in the compiler."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            assert not set(consts) & {"numpy", "torch", "triton"}, f"{path}:{node.lineno} branches on a backend name"


def test_planner_takes_its_machine_model_from_the_backend():
    from seqc.backends.torch.backend import TorchBackend
    params = {"d_model": 8, "d_state": 8}

    class FreeConv(TorchBackend):
        name = "freeconv_test"

        def machine(self, device, dtype):
            m = super().machine(device, dtype)
            return dict(m, step=0.0, ns=dict(m["ns"], conv=1e-6, lti_conv=1e-6, lti_fft=1e-6))
    register_backend(FreeConv())
    try:
        plans = {n.meta["plan"] for n in plan_graph(example("s4d.seq"), "freeconv_test", params, length=4).order()
                 if "plan" in n.meta}
        assert plans == {"conv"}
        plans = {n.meta["plan"] for n in plan_graph(example("s4d.seq"), "torch", params, length=4).order()
                 if "plan" in n.meta}
        assert plans == {"scan"}            # the generated recurrence kernel (scan and recurrent tie)
    finally:
        from seqc import backend
        backend._REGISTRY.pop("freeconv_test")
    # the torch backend's cuda model is reachable and differs from its cpu model
    assert get_backend("torch").machine("cuda", "float32") != get_backend("torch").machine("cpu", "float32")
    g = plan_graph(example("mamba.seq"), "torch", {"n_layers": 1}, device="cuda", length=4096)
    from seqc.passes import PlanContext, explain
    text = explain(g, PlanContext(length=4096, device="cuda", machine=get_backend("torch").machine("cuda", "float32")))
    assert "device=cuda" in text and "0.005" in text          # the cuda model's selective-scan cost


@pytest.mark.parametrize("spec,params", [("s4d.seq", {"d_model": 16, "d_state": 64}),
                                         ("s4d.seq", {"d_model": 64, "d_state": 64}),
                                         ("h3.seq", {"n_layers": 1})])
def test_threshold_table_matches_the_planner(spec, params):
    from seqc.passes import PlanContext
    from seqc.passes.planner import TABLE_BATCHES, plan_for_shapes
    g = plan_graph(example(spec), "torch", params, length=None)
    nodes = [n for n in g.order() if n.meta.get("plan") == "auto"]
    assert nodes, "these specs have a length-dependent plan"
    ctx = PlanContext(length=None, backend="torch", machine=get_backend("torch").machine("cpu", "float32"))
    rnd = random.Random(0)
    lengths = sorted({(1 << k) + d for k in range(21) for d in (-1, 0, 1) if (1 << k) + d >= 1} |
                     {rnd.randrange(1, 1 << 16) for _ in range(60)} |
                     {b + d for n in nodes for row in n.meta["plan_table"].rows.values() for b, _ in row
                      for d in (-1, 0, 1) if b + d >= 1})
    for n in nodes:
        table = n.meta["plan_table"]
        assert len(table.plans()) > 1
        for training in (False, True):
            for batch in TABLE_BATCHES:
                for length in lengths:
                    assert table.choose(batch, length, training) == \
                        plan_for_shapes(n, ctx, batch, length, training), (batch, length, training)


RUNTIME = ["backends/torch/module.py", "backends/torch/codegen.py", "backends/torch/base.py",
           "backends/torch/layers.py", "backends/torch/lti.py", "backends/torch/scan.py",
           "backends/torch/functional.py", "seqc/lower.py", "seqc/codegen.py"]


def test_the_torch_runtime_never_imports_the_passes():
    for path in RUNTIME + [p for p in ("backends/torch/ops",) if os.path.isdir(os.path.join(ROOT, p))]:
        full = os.path.join(ROOT, path)
        files = [full] if full.endswith(".py") else [os.path.join(full, f) for f in os.listdir(full)
                                                    if f.endswith(".py")]
        for f in files:
            for node in ast.walk(ast.parse(open(f).read())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not any("passes" in n for n in names), f"{f}:{node.lineno} imports the passes"


_BLOCKED = r"""
import sys
import numpy as np, torch
import seqc
from seqc.compiler import plan_graph
from seqc.lower import lower
params = {"d_model": 8, "d_state": 8}
ref = seqc.compile(sys.argv[1], backend="numpy", params=params)
program = lower(plan_graph(sys.argv[1], "torch", params, length=None))
for name in [m for m in sys.modules if m.startswith("seqc.passes")]:
    sys.modules[name] = None                     # `import seqc.passes...` now raises
for name in [m for m in sys.modules if m.startswith("seqc.backends.torch")]:
    del sys.modules[name]                        # re-imported fresh below
from seqc.backends.torch.module import build_module
try:
    import seqc.passes.planner
    raise SystemExit("the passes were not blocked")
except ImportError:
    pass
model = build_module(program).double().load_numpy(ref.weights)
ssm = model.get_submodule("ssm")
assert ssm.plan == "auto"
seen = set()
for length in (8, 4096):
    x = np.random.default_rng(0).standard_normal((1, length, 8))
    with torch.no_grad():
        y = model(torch.as_tensor(x)).numpy()
    seen.add(ssm.last_plan)
    assert ssm.last_plan == program.layers()[0].plan_table.choose(1, length, False)
    err = np.abs(ref(x, ref.weights) - y).max()
    assert err < 1e-10, err
assert len(seen) == 2, seen
print("ran", sorted(seen))
"""


def test_auto_plan_runs_with_the_passes_blocked():
    """Compile (passes allowed), then rebuild and run the model from its program with every
    seqc.passes import failing: the per-call plan comes from the threshold table.
    (In a subprocess: the fresh imports must not leak into other tests.)"""
    import subprocess
    # without the numba kernels the inference plan depends on the length (recurrence, then conv)
    env = dict(os.environ, SEQC_NO_NUMBA="1")
    p = subprocess.run([sys.executable, "-c", _BLOCKED, example("s4d.seq")], capture_output=True, text=True,
                       cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith("ran ")


MEMBER = """model M() {
  input u: [B, L, 8]
  s = ssm(u, d_state = 4)
  a = linear(u, 8)
  g = gelu(s)
  return g + a
}"""


def test_regions_are_objects_carried_to_the_program_and_layers(monkeypatch):
    g = plan_graph(example("mamba.seq"), "torch", {"n_layers": 1})
    program = lower(g)
    anchors = {r.anchor: r for r in program.regions}
    conv = next(c for c in program.calls if c.op == "conv1d")
    scan = next(c for c in program.calls if c.op == "selective_ssm")
    assert anchors[conv.node] is conv.region and anchors[scan.node] is scan.region
    assert conv.region.flags == {"bias": True, "activation": "silu"}
    assert scan.region.flags == {"delta_bias": False, "delta_softplus": True, "disc": "mamba", "d_skip": True,
                                 "gate": "silu"}
    assert scan.region.id == g.nodes[scan.node].meta["fusion"] and "fusion=f1" in g.dump()
    assert set(scan.region.inputs) == set(g.nodes[scan.node].inputs)
    # the Call's fields come from the node
    assert scan.spec.name == "selective_ssm" and scan.is_layer and scan.plan == "scan"
    assert scan.where.endswith("mamba_block.seq:15:7") and scan.disc is g.nodes[scan.node].meta.get("disc")
    # each layer module is configured from its call (region included)
    from seqc.backends.torch import layers
    got = {}
    monkeypatch.setattr(layers.SelectiveSSM, "configure", lambda self, call: got.setdefault("call", call),
                        raising=False)
    model = seqc.compile(example("mamba.seq"), params={"n_layers": 1})
    assert got["call"].region.flags["gate"] == "silu" and got["call"].op == "selective_ssm"
    assert [model.get_submodule(c.name) for c in model.program.layers()] == list(model.layer_modules)


def test_an_epilogue_member_runs_right_after_its_anchor(rng):
    g = plan_graph(MEMBER, "torch")
    program = lower(g)
    (region,) = program.regions
    ops = [c.op for c in program.calls]
    assert [g.nodes[m].op for m in region.epilogue] == ["gelu", "add"]
    assert ops.index("gelu") == ops.index("ssm") + 1, ops
    assert [n.op for n in g.order()].index("linear") < [n.op for n in g.order()].index("gelu"), \
        "the IR's own order puts the linear in between"
    source = get_backend("torch").emit(program)
    lines = [ln.strip() for ln in source.splitlines()]
    i = next(k for k, ln in enumerate(lines) if "region f0" in ln)
    assert "M[0]" in lines[i + 1] and "fn.gelu(" in lines[i + 2]
    assert seqc.difftest(MEMBER, params=None, grads=False).ok


def test_compile_device_and_dtype_options():
    m = seqc.compile(example("s4d.seq"), params={"d_model": 8, "d_state": 8}, dtype="float64")
    assert next(m.parameters()).dtype == torch.float64
    m = seqc.compile(example("s4d.seq"), params={"d_model": 8, "d_state": 8})
    assert next(m.parameters()).dtype == torch.float32
    with pytest.raises(seqc.SeqcError, match="unknown dtype"):
        seqc.compile(example("s4d.seq"), dtype="float8")
    ref = seqc.compile(example("s4d.seq"), backend="numpy", params={"d_model": 8, "d_state": 8})
    out = get_backend("numpy").forward(ref, [np.ones((1, 3, 8))])
    assert out[0].shape == (1, 3, 8) and out[0].dtype == np.float64


class _Custom(Backend):
    name = "custom_test"


def test_a_backend_without_a_machine_model_says_so():
    register_backend(_Custom())
    try:
        with pytest.raises(NotImplementedError):
            plan_graph(example("s4d.seq"), "custom_test", {"d_model": 8, "d_state": 8})
    finally:
        from seqc import backend
        backend._REGISTRY.pop("custom_test")


def test_compile_refuses_an_op_the_backend_cannot_run(monkeypatch):
    from seqc.backends.torch import functional
    monkeypatch.delitem(functional.FUNCTIONS, "gelu")
    with pytest.raises(seqc.SeqcError, match="torch backend has no implementation of 'gelu'") as e:
        seqc.compile(MEMBER)
    assert e.value.line == 5
    seqc.compile(MEMBER, backend="numpy")
