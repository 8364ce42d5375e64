"""difftest itself: faults planted in one backend (or one plan) are caught and
localised to the node (op and FILE:LINE:COL); gradients of every parameter and
input are compared; stepping is checked against the forward pass; every example
passes in float32 with gradients compared."""
from __future__ import annotations

import os

import pytest

import seqc
from seqc.differential import inject_fault

from conftest import EXAMPLES, example

SMALL = {"attention": {"d_model": 16}, "s4d": {"d_model": 8, "d_state": 8}, "lstm": {"d_model": 8, "hidden": 8},
         "mamba": {"n_layers": 1, "d_model": 16}}


def _small(path):
    """Small parameters: the table above, else one layer where the model has a layer count."""
    stem = os.path.basename(path)[:-4]
    if stem in SMALL:
        return SMALL[stem]
    with open(path) as f:
        module = seqc.parse(f.read(), path)
    names = {p.name for d in module.definitions if d.kind == "model" for p in d.params}
    return {k: 1 for k in ("n_layers", "layers") if k in names}


def _node(path, params, pred):
    from seqc.compiler import plan_graph
    g = plan_graph(path, "torch", params)
    n = next(n for n in g.order() if pred(n))
    return n, f"{n.span.file}:{n.span.line}:{n.span.column}"


@pytest.mark.parametrize("path", EXAMPLES,
                         ids=lambda p: os.path.basename(p))
def test_every_example_passes_in_float32_with_gradients(path):
    report = seqc.difftest(path, ("numpy", "torch"), _small(path), dtype="float32", length=8)
    assert report.ok, str(report)
    state_dict = seqc.compile(path, params=_small(path)).state_dict()
    # every parameter's gradient was checked, and the float inputs'
    assert {g.name for g in report.grads if not g.name.startswith("input ")} == set(state_dict)
    assert report.steps and all(s.ok for s in report.steps)


def test_sign_flip_is_localised_to_its_node():
    params = {"n_layers": 1, "d_model": 16}
    node, where = _node(example("mamba.seq"), params, lambda n: n.op == "conv1d")
    assert seqc.difftest(example("mamba.seq"), params=params).ok
    with inject_fault(node.name, "sign"):
        report = seqc.difftest(example("mamba.seq"), params=params)
    assert not report.ok
    first = report.first_divergence
    assert (first.op, first.where, first.node) == ("conv1d", where, node.id)
    # the fault may also be addressed by its source location, on the first backend
    with inject_fault(where, "sign", backend="numpy"):
        report = seqc.difftest(example("mamba.seq"), params=params, grads=False, step=False)
    assert report.first_divergence.where == where


def test_off_by_one_causal_mask_is_caught_at_the_attention_node():
    params = {"n_layers": 1}
    node, where = _node(example("transformer.seq"), params, lambda n: n.op == "attention")
    with inject_fault("attention", "causal"):
        report = seqc.difftest(example("transformer.seq"), params=params, grads=False)
    assert not report.ok
    assert (report.first_divergence.op, report.first_divergence.where) == ("attention", where)
    # every earlier node still agrees
    assert all(r.ok for r in report.rows[:report.rows.index(report.first_divergence)])
    assert seqc.difftest(example("transformer.seq"), params=params, grads=False).ok


@pytest.mark.parametrize("spec,op", [("s4d.seq", "ssm"), ("mamba.seq", "selective_ssm")])
def test_wrong_discretization_is_caught_at_the_ssm_node(spec, op):
    params = _small(example(spec))
    node, where = _node(example(spec), params, lambda n: n.op == op)
    with inject_fault(op, "discretization"):
        report = seqc.difftest(example(spec), params=params, grads=False, step=False)
    assert not report.ok
    assert (report.first_divergence.op, report.first_divergence.where) == (op, where)


def test_numpy_plans_are_different_computations(monkeypatch):
    """numpy,numpy with conv,scan runs each plan's oracle: a bug in one plan only is caught."""
    from seqc.ops import ssm as ssm_oracle
    plans = ssm_oracle._PLAN_FNS
    seen = []
    for name in ("conv", "scan"):
        monkeypatch.setitem(plans, name, (lambda fn, name: lambda *a: seen.append(name) or fn(*a))(plans[name], name))
    params = {"d_model": 8, "d_state": 8}
    report = seqc.difftest(example("s4d.seq"), ("numpy", "numpy"), params, modes=("conv", "scan"), grads=False)
    assert report.ok and {"conv", "scan"} <= set(seen)

    conv = plans["conv"]
    monkeypatch.setitem(plans, "conv", lambda *a: (lambda y, x: (y * 1.0001, x))(*conv(*a)))
    report = seqc.difftest(example("s4d.seq"), ("numpy", "numpy"), params, modes=("conv", "scan"), grads=False)
    assert not report.ok and report.first_divergence.op == "ssm"
    assert seqc.difftest(example("s4d.seq"), ("numpy", "numpy"), params, modes=("scan", "scan"), grads=False).ok


def _planted_gradient(monkeypatch, key, factor):
    """Scale one parameter's gradient in the last torch model difftest builds (forward untouched)."""
    from seqc.backends.torch.backend import TorchBackend
    build = TorchBackend.build
    built = []

    def build_with_bug(self, *a, **kw):
        model = build(self, *a, **kw)
        for m in built:      # only the latest model carries the bug
            m._bug.remove()
        object.__setattr__(model, "_bug", dict(model.named_parameters())[key].register_hook(lambda g: g * factor))
        built[:] = [model]
        return model
    monkeypatch.setattr(TorchBackend, "build", build_with_bug)


@pytest.mark.parametrize("backends", [("numpy", "torch"), ("torch", "numpy")])
def test_a_wrong_parameter_gradient_is_named_with_its_layer(monkeypatch, backends):
    params = {"n_layers": 1, "d_model": 16}
    key = "layers.0.mixer.dt_proj.bias"
    node, where = _node(example("mamba.seq"), params, lambda n: n.name == "layers.0.mixer.dt_proj")
    _planted_gradient(monkeypatch, key, 1.001)
    report = seqc.difftest(example("mamba.seq"), backends, params, dtype="float32", step=False)
    assert not report.ok
    assert all(r.ok for r in report.rows), "the forward values are untouched"
    worst = report.worst_gradient
    assert (worst.name, worst.layer, worst.where, worst.ok) == (key, "layers.0.mixer.dt_proj", where, False)
    assert [g.name for g in report.grads if not g.ok] == [key]
    assert key in str(report)


def test_gradients_between_two_autograd_runs_are_compared_tensor_by_tensor(monkeypatch):
    params = {"d_model": 8, "d_state": 8}
    report = seqc.difftest(example("s4d.seq"), ("torch", "torch"), params, modes=("conv", "recurrent"))
    assert report.ok and report.grads and all(g.method == "tensor" for g in report.grads)
    assert {g.name for g in report.grads} >= {"ssm.log_dt", "ssm.C", "ssm.D", "input u"}
    _planted_gradient(monkeypatch, "ssm.C", 1.00001)
    report = seqc.difftest(example("s4d.seq"), ("torch", "torch"), params, modes=("conv", "recurrent"))
    assert not report.ok and report.worst_gradient.name == "ssm.C"


def test_step_disagreeing_with_forward_is_reported(monkeypatch):
    from seqc.backends.torch import layers
    step = layers.LSTM.step
    monkeypatch.setattr(layers.LSTM, "step", lambda self, *a, **kw: (lambda y, s: (y * 1.01, s))(*step(self, *a, **kw)))
    report = seqc.difftest(example("lstm.seq"), params={"d_model": 8, "hidden": 8}, grads=False)
    assert all(r.ok for r in report.rows)
    assert not report.ok and [s.ok for s in report.steps] == [True, False]


def test_difftest_cli(capsys, tmp_path):
    from seqc.cli import main
    code = main(["difftest", example("mamba.seq"), "-p", "n_layers=1", "--dtype", "float32", "--length", "8"])
    out = capsys.readouterr().out
    assert code == 0 and "gradients of" in out and "tolerances" in out and "float32" in out
    for bad in ("nan", "-1", "0", "inf"):
        code = main(["difftest", example("s4d.seq"), "--tolerance", bad])
        err = capsys.readouterr().err
        assert code == 2 and "tolerance" in err and "Traceback" not in err
    code = main(["difftest", example("s4d.seq"), "--dtype", "float16"])
    assert code == 2 and "unknown dtype" in capsys.readouterr().err
    code = main(["difftest", example("s4d.seq"), "-p", "d_model=8", "-p", "d_state=8", "--backends", "numpy,numpy",
                 "--modes", "conv,scan"])
    assert code == 0 and "numpy[conv] vs numpy[scan]" in capsys.readouterr().out


def test_directional_check_of_an_all_zero_parameter():
    """S4D with one mode per channel (d_state = 2) has A_imag = 0 everywhere (s4d-lin): the
    central difference must step on a unit scale (a 1e-8 step left it to rounding, 1e-3 relative
    error on a correct gradient at seed 10).  The torch gradient itself matches a well-stepped
    difference of the NumPy oracle to 4e-8."""
    spec = """model M(d_model = 3, d_state = 2) {
  input u: [B, L, d_model]
  s = ssm(u, d_state = d_state, kind = diag)
  return s
}"""
    for seed in (2, 10, 11):
        report = seqc.difftest(spec, backends=("numpy", "torch"), seed=seed, length=1, step=False)
        row = next(g for g in report.grads if g.name == "s.A_imag")
        assert row.ok and row.error < 1e-5, (seed, row)
