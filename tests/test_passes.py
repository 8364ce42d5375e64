"""Pass manager, clean-up passes, fusion rewrites, discretization annotations
and the planner's decisions."""
from __future__ import annotations

import numpy as np
import pytest
import sympy
import torch

import seqc
from conftest import assert_agree, example
from seqc import discretization
from seqc.passes import Instruments, Pipeline, PlanContext, explain, run_pipeline
from seqc.passes.planner import choose


def _ops(g):
    return [n.op for n in g.order()]


def test_pipeline_runs_verifier_and_leaves_input_graph_alone():
    g = seqc.build_graph(example("mamba.seq"), {"n_layers": 1})
    before = g.dump()
    out = []
    planned = run_pipeline(g, PlanContext(), instruments=Instruments(print_after_all=True, time_passes=True,
                                                                      out=out.append))
    assert g.dump() == before
    assert sum("IR after" in o for o in out) == len(Pipeline().names)
    assert any("total" in o for o in out)
    assert [n.meta["plan"] for n in planned.order() if n.op == "selective_ssm"] == ["scan"]


def test_users_can_add_and_drop_passes():
    p = Pipeline().drop("fuse-elementwise")
    assert "fuse-elementwise" not in p.names
    p.add("fuse-elementwise", after="share-subexpressions")
    assert p.names.index("fuse-elementwise") == p.names.index("share-subexpressions") + 1
    with pytest.raises(seqc.SeqcError, match="did you mean 'plan'"):
        Pipeline.parse("fold-identities,plann")


SRC = """model M(d = 8) {
  input x: [B, L, d]
  a = silu(x)
  b = silu(x)
  c = dropout(a + b, p = 0.0)
  conv1d = conv1d(c, kernel = 3)
  h = silu(conv1d)
  return h * sigmoid(x)
}"""


def test_cleanup_and_fusion_rewrites_preserve_semantics(rng):
    g = seqc.build_graph(SRC)
    planned = run_pipeline(g, PlanContext())
    ops = _ops(planned)
    assert ops.count("silu") == 1, "identical silu(x) shared"
    assert "dropout" not in ops, "dropout p=0 folded"
    conv = next(n for n in planned.order() if n.op == "conv1d")
    assert conv.attrs["activation"] == "silu", "silu(conv1d) fused into the convolution"
    assert "gate" in ops and "mul" not in ops, "x * sigmoid(g) became a gate"
    # the unoptimised and optimised graphs compute the same function
    from seqc.backends.numpy.codegen import NumpyModel
    raw, opt = NumpyModel(g), NumpyModel(planned)
    x = rng.standard_normal((2, 7, 8))
    assert_agree(raw(x, raw.weights), opt(x, raw.weights), 1e-12)


def test_gate_folds_into_selective_scan(rng):
    src = """model M() {
  input u: [B, L, 8]
  input z: [B, L, 8]
  s = selective_ssm(u, u, u, u, d_state = 8)
  return s * silu(z)
}"""
    g = seqc.build_graph(src)
    planned = run_pipeline(g, PlanContext())
    scan = next(n for n in planned.order() if n.op == "selective_ssm")
    assert len(scan.inputs) == 5 and "silu(z)-gate" in scan.meta["fused"]
    from seqc.backends.numpy.codegen import NumpyModel
    raw, opt = NumpyModel(g), NumpyModel(planned)
    u, z = rng.standard_normal((2, 2, 6, 8))
    assert_agree(raw(u, z, raw.weights), opt(u, z, raw.weights), 1e-12)


def test_planner_changes_its_mind_with_length_for_s4d():
    """Training (fitted with benchmarks/bench_plans.py --cpu-time --train): the generated recurrence kernel
    is cheaper at short lengths, the FFT convolution (whose backward is cheap) at long ones."""
    g = seqc.build_graph(example("s4d.seq"))
    node = next(n for n in g.order() if n.op == "ssm")
    short = choose(node, PlanContext(length=64, batch=1, training=True))[1].plan
    long = choose(node, PlanContext(length=16384, batch=1, training=True))[1].plan
    assert (short, long) == ("scan", "conv")
    text = explain(g, PlanContext(length=16384, training=True))
    assert "winner: conv" in text and "recurrent" in text


def test_planner_prefers_the_recurrence_kernel_for_inference_and_conv_without_it(monkeypatch):
    """Inference: the kernel's forward costs less per state element than the convolution's
    Vandermonde kernel alone, at every length.  Without the kernels (SEQC_NO_NUMBA) the
    torch engine's scan loops over chunks, and the convolution wins at long lengths."""
    g = seqc.build_graph(example("s4d.seq"))
    node = next(n for n in g.order() if n.op == "ssm")
    for L in (16, 1024, 16384):
        opts, best, why = choose(node, PlanContext(length=L, batch=1))
        assert best.plan == "scan" and "as cheap: recurrent" in why
    monkeypatch.setenv("SEQC_NO_NUMBA", "1")
    assert choose(node, PlanContext(length=16384, batch=1))[1].plan == "conv"


def test_planner_never_picks_conv_for_selective_and_honours_mode():
    g = seqc.build_graph(example("mamba.seq"), {"n_layers": 1})
    node = next(n for n in g.order() if n.op == "selective_ssm")
    opts, best, _ = choose(node, PlanContext(length=100000))
    assert best.plan == "scan" and not next(o for o in opts if o.plan == "conv").legal
    _, best, why = choose(node, PlanContext(mode="recurrent"))
    assert best.plan == "recurrent" and "forced" in why
    _, best, _ = choose(node, PlanContext(mode="conv"))  # not legal: the planner falls back
    assert best.plan == "scan"


def test_discretize_annotates_and_backends_execute_the_derivation(rng):
    g = run_pipeline(seqc.build_graph(example("s4d.seq"), {"d_model": 4, "d_state": 4}), PlanContext())
    node = next(n for n in g.order() if n.op == "ssm")
    assert node.meta["disc_form"] == discretization.describe("diag", "zoh")
    assert node.meta["disc"] is discretization.program("diag", "zoh")
    params = {"d_model": 4, "d_state": 4}
    ref = seqc.compile(example("s4d.seq"), backend="numpy", params=params)
    x = rng.standard_normal((1, 9, 4))
    before = ref(x, ref.weights)
    A, Bs, dt = discretization.A, discretization.B, discretization.dt
    # change the derivation (Bbar doubled): both backends' outputs must change accordingly;
    # a torch model takes the program it was compiled with
    with discretization.override("diag", "zoh", sympy.exp(A * dt), 2 * Bs * (sympy.exp(A * dt) - 1) / A):
        # a compiled model keeps the program it was compiled with: recompile under the override
        assert np.array_equal(ref(x, ref.weights), before)
        after = seqc.compile(example("s4d.seq"), backend="numpy", params=params)(x, ref.weights)
        tm = seqc.compile(example("s4d.seq"), backend="torch", params=params, mode="conv")
        after_t = tm.double().load_numpy(ref.weights)(torch.as_tensor(x))
    D = ref.weights["ssm.D"]
    assert np.abs(after - before).max() > 1e-3
    assert_agree(after - D * x, 2 * (before - D * x), 1e-9, "numpy follows the derivation")
    assert_agree(after, after_t, 1e-9, "torch follows the derivation")
    tm_after = seqc.compile(example("s4d.seq"), backend="torch", params=params, mode="conv")
    assert_agree(tm_after.double().load_numpy(ref.weights)(torch.as_tensor(x)), before, 1e-9, "override undone")


@pytest.mark.parametrize("engine", ["numba", "torch"])
def test_selective_scan_kernels_follow_an_overridden_derivation(rng, engine, monkeypatch):
    """Override mamba's derivation (Euler for A too, Bbar tripled): the NumPy oracle, the
    torch engine and the generated numba kernels, forward and backward, all follow it."""
    monkeypatch.setenv("SEQC_NO_NUMBA", "0" if engine == "numba" else "1")
    params = {"n_layers": 1, "d_model": 16, "d_state": 4}
    ref = seqc.compile(example("mamba.seq"), backend="numpy", params=params)
    x = rng.standard_normal((2, 13, 16))
    before = ref(x, ref.weights)
    A, Bs, dt = discretization.A, discretization.B, discretization.dt
    with discretization.override("diag", "mamba", 1 + A * dt, 3 * dt * Bs):
        after = seqc.compile(example("mamba.seq"), backend="numpy", params=params)(x, ref.weights)
        tm = seqc.compile(example("mamba.seq"), backend="torch", params=params).double().load_numpy(ref.weights)
        program = tm.get_submodule("layers.0.mixer").disc_program
    assert program.digest != discretization.program("diag", "mamba").digest   # built with the override
    from seqc.backends.torch import scan
    picked = scan._pick_engine(torch.zeros(1, 2, 32, dtype=torch.float64), program, None)
    assert isinstance(picked, scan._NumbaEngine if engine == "numba" else scan._TorchEngine)
    assert np.abs(after - before).max() > 1e-5      # the mixer's share of the residual output changed
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y = tm(xt)
    assert_agree(y.detach().numpy(), after, 1e-10, f"{engine} follows the overridden derivation")
    # backward through the overridden program: against autograd of the torch engine on the same model
    (g,) = torch.autograd.grad(y.square().sum(), xt)
    monkeypatch.setenv("SEQC_NO_NUMBA", "1")
    xr = xt.detach().requires_grad_()
    (g_ref,) = torch.autograd.grad(tm(xr).square().sum(), xr)
    assert_agree(g.numpy(), g_ref.numpy(), 1e-10, "gradients follow it too")


def test_planned_mamba_ir_matches_by_pattern():
    """The planned IR of one Mamba layer, matched FileCheck-style: values by their
    bindings, never by node id, so a renumbering pass does not break it but a
    rewired edge, a lost fusion or another plan does."""
    from conftest import filecheck
    g = run_pipeline(seqc.build_graph(example("mamba.seq"), {"n_layers": 1}), PlanContext(length=1024))
    filecheck(g.dump(), r"""
        CHECK: [[X:%\d+]] = input[name=x]() : f32[B, L, 64]
        CHECK-NEXT: [[N:%\d+]] = rmsnorm([[X]])
        CHECK-NEXT: [[IN:%\d+]] = linear[bias=false, out=256]([[N]])
        CHECK-NEXT: [[XZ:%\d+]] = split[sizes=2]([[IN]]) : (f32[B, L, 128], f32[B, L, 128])
        CHECK-NEXT: [[CONV:%\d+]] = conv1d[activation=silu]([[XZ]]) : f32[B, L, 128] {fused=causal-conv+bias+silu, fusion=[[F0:f\d+]]}
        CHECK-NEXT: [[XP:%\d+]] = linear[bias=false, out=36]([[CONV]])
        CHECK-NEXT: [[PARTS:%\d+]] = split[sizes=[4, 16, 16]]([[XP]])
        CHECK-NEXT: [[DT:%\d+]] = linear[init=mamba_dt, out=128]([[PARTS]])
        CHECK-NEXT: [[Y:%\d+]] = selective_ssm[plan=auto]([[CONV]], [[DT]], [[PARTS]].1, [[PARTS]].2, [[XZ]].1) : f32[B, L, 128] {{{.*}}fusion=[[F1:f\d+]], plan=scan}
        CHECK-NEXT: [[OUT:%\d+]] = linear[bias=false, out=64]([[Y]])
        CHECK-NEXT: [[R:%\d+]] = add([[X]], [[OUT]])
        CHECK-NEXT: return [[R]]
    """)
    ssm = next(n for n in g.order() if n.op == "selective_ssm")
    assert ssm.meta["plan"] == "scan" and ssm.meta["fusion"] != next(
        n for n in g.order() if n.op == "conv1d").meta["fusion"]
