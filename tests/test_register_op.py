"""A user-defined op registered with seqc.register_op - a weighted "scale" layer (NumPy
reference + torch Layer subclass) and a stateless "cube" (@torch_function) - works in
check / graph / emit / run / difftest like a built-in one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import seqc
from seqc.backends.torch.base import FUNCTIONS, LAYERS, Pointwise, torch_function
from seqc.cli import main
from seqc.ops import OPS, Attr, OpSpec

SPEC = """model Scaled(d = 4) {
  input x: [B, L, d]
  s = scale(x, init_value = 0.5)
  y = linear(cube(s), d)
  return y
}
"""


@pytest.fixture
def user_ops():
    """Register the two ops for one test, and remove them again (the tables are global)."""
    def scale_reference(x, *, p, **attrs):
        return np.asarray(x, dtype=np.float64) * p["weight"]

    def cube_reference(x, *, p=None, **attrs):
        return np.asarray(x, dtype=np.float64) ** 3

    seqc.register_op(OpSpec(
        "scale", ("x",), (Attr("init_value", "float", 1.0, init_only=True),),
        shape=lambda shapes, attrs: [tuple(shapes[0])],
        weights=lambda shapes, attrs: {"weight": (int(shapes[0][-1]),)},
        reference=scale_reference,
        init=lambda shapes, attrs, rng: {"weight": attrs["init_value"] + rng.uniform(0, 1, shapes["weight"])},
        doc="x * weight, per feature"))
    seqc.register_op(OpSpec("cube", ("x",), shape=lambda shapes, attrs: [tuple(shapes[0])],
                            kind="elementwise", reference=cube_reference))

    class Scale(Pointwise):
        op = "scale"

        def map(self, x):
            return x * self.weight

    torch_function("cube")(lambda x, **_: x ** 3)
    yield Scale
    for table in (OPS, LAYERS, FUNCTIONS):
        table.pop("scale", None)
        table.pop("cube", None)


def test_user_op_in_every_command(user_ops, tmp_path, capsys):
    path = tmp_path / "scaled.seq"
    path.write_text(SPEC)
    assert main(["check", str(path)]) == 0
    assert "2 layers" in capsys.readouterr().out
    assert main(["graph", str(path)]) == 0
    assert "scale[" in capsys.readouterr().out
    assert main(["emit", str(path), "--backend", "torch"]) == 0
    assert "fn.cube(" in capsys.readouterr().out
    assert main(["emit", str(path), "--backend", "numpy"]) == 0
    assert "ops.scale(" in capsys.readouterr().out
    assert main(["run", str(path), "--backend", "torch"]) == 0
    assert main(["difftest", str(path)]) == 0
    assert "OK" in capsys.readouterr().out


def test_user_op_values_weights_and_difftest(user_ops):
    tm = seqc.compile(SPEC)
    assert isinstance(tm.get_submodule("s"), user_ops)
    ref = seqc.compile(SPEC, backend="numpy")
    w = ref.weights["s.weight"]
    assert w.shape == (4,) and (w >= 0.5).all() and (w <= 1.5).all()      # the op's own initialiser
    tm = tm.double().load_numpy(ref.weights)
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    want = ((x * w) ** 3) @ ref.weights["y.weight"].T + ref.weights["y.bias"]
    np.testing.assert_allclose(ref(x, ref.weights), want, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(tm(torch.as_tensor(x)).detach().numpy(), want, rtol=1e-13, atol=1e-13)
    report = seqc.difftest(SPEC)
    assert report.ok and [r.op for r in report.rows] == ["scale", "cube", "linear"], str(report)


def test_user_op_mistakes_are_located_errors(user_ops):
    with pytest.raises(seqc.SeqcError, match="'scale' has no argument 'init_vlaue'.*did you mean 'init_value'"):
        seqc.build_graph(SPEC.replace("init_value", "init_vlaue"))
    with pytest.raises(seqc.SeqcError, match="needs an OpSpec"):
        seqc.register_op({"name": "bad"})
    with pytest.raises(seqc.SeqcError, match="identifier"):
        seqc.register_op(OpSpec("bad-name", ("x",), shape=lambda s, a: [tuple(s[0])]))


def test_readme_example_runs(capsys):
    import os
    import re

    from conftest import ROOT
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("### Adding your own op"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    try:
        exec(compile(code, "README.md", "exec"), {})   # noqa: S102 - the project's own README
        out = capsys.readouterr().out
        assert "difftest numpy vs torch: OK" in out and "scale" in out and "cube" in out
    finally:
        for table in (OPS, LAYERS, FUNCTIONS):
            table.pop("scale", None)
            table.pop("cube", None)


def test_every_op_has_a_reference_and_a_torch_implementation():
    from seqc.backends.torch import layers
    assert layers.LAYERS is LAYERS
    assert set(LAYERS) == {n for n, s in OPS.items() if s.is_layer}
    assert set(FUNCTIONS) == {n for n, s in OPS.items() if not s.is_layer}
    for name, spec in OPS.items():
        assert spec.reference is not None, name
        assert (spec.init is not None) == spec.has_weights, name
        if spec.stateful:
            assert spec.reference_step is not None and spec.reference_init_state is not None, name


def test_layer_configure_takes_the_compilers_decisions():
    from types import SimpleNamespace
    compiled = object()
    disc = SimpleNamespace(compile=lambda target: compiled if target == "torch" else None)
    layer = LAYERS["selective_ssm"]([4, 4, 2, 2], {"d_state": 2})
    layer.configure(SimpleNamespace(plan="recurrent", plan_table={"x": 1}, region="f0", disc=disc))
    assert (layer.plan, layer.plan_table, layer.region, layer.discretize_fn) == ("recurrent", {"x": 1}, "f0", compiled)
    lin = LAYERS["linear"]([3], {"out": 2})
    lin.configure(SimpleNamespace(plan=None, node=1))           # a call without these fields leaves defaults
    assert lin.plan_table is None and not hasattr(lin, "discretize_fn")
