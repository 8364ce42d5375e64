"""Every example compiles on the numpy and torch backends; the faces agree:
step == forward, chunked == whole, torch == numpy, plans agree with each other."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import seqc
from conftest import EXAMPLES, assert_agree, example

B, L = 2, 11


def _input(graph, rng, batch=B, length=L):
    n = graph.nodes[graph.inputs[0]]
    if n.dtype == "int":
        vocab = min(u.attrs["vocab"] for u in graph.users(n.id) if u.op == "embedding")
        return rng.integers(0, vocab, size=(batch, length))
    return rng.standard_normal((batch, length, int(n.shape[-1])))


def _small(path):
    return {"n_layers": 1} if "n_layers" in open(path).read() else None


@pytest.fixture(scope="module")
def compiled():
    out = {}
    for f in EXAMPLES:
        ref = seqc.compile(f, backend="numpy", params=_small(f))
        tm = seqc.compile(f, backend="torch", params=_small(f)).double().load_numpy(ref.weights)
        out[os.path.basename(f)] = (ref, tm)
    return out


@pytest.mark.parametrize("name", [os.path.basename(f) for f in EXAMPLES])
def test_numpy_step_equals_forward(compiled, name, rng):
    ref, _ = compiled[name]
    x = _input(ref.graph, rng)
    y = ref(x, ref.weights)
    state = ref.init_state(B)
    ys = []
    for t in range(L):
        y_t, state = ref.step(x[:, t], state=state)
        ys.append(y_t)
    assert_agree(y, np.stack(ys, 1), 1e-10, "numpy step vs forward")


@pytest.mark.parametrize("name", [os.path.basename(f) for f in EXAMPLES])
def test_torch_matches_numpy_and_its_own_faces(compiled, name, rng):
    ref, tm = compiled[name]
    x = _input(ref.graph, rng)
    y_ref = ref(x, ref.weights)
    xt = torch.as_tensor(x)
    y, final = tm(xt, return_state=True)
    assert_agree(y_ref, y, 1e-10, "torch vs numpy")
    # recurrent face
    state = tm.init_state(B)
    ys = []
    for t in range(L):
        y_t, state = tm.step(xt[:, t], state)
        ys.append(y_t)
    assert_agree(y, torch.stack(ys, 1), 1e-10, "torch step vs forward")
    # streaming: two chunks with the state handed over equal one pass, and the final states agree
    a, mid = tm(xt[:, :5], return_state=True)
    b, end = tm(xt[:, 5:], state=mid, return_state=True)
    assert_agree(y, torch.cat([a, b], 1), 1e-10, "chunked vs whole")
    for key in final:
        for k in final[key]:
            assert_agree(final[key][k], end[key][k], 1e-10, f"final state {key}.{k}")


@pytest.mark.parametrize("mode", ["conv", "scan", "recurrent"])
def test_plans_agree_on_s4d(mode, rng):
    ref = seqc.compile(example("s4d.seq"), backend="numpy", params={"d_model": 8, "d_state": 16})
    tm = seqc.compile(example("s4d.seq"), backend="torch", params={"d_model": 8, "d_state": 16}, mode=mode)
    assert tm.get_submodule("ssm").plan == mode
    tm = tm.double().load_numpy(ref.weights)
    x = rng.standard_normal((2, 50, 8))
    assert_agree(ref(x, ref.weights), tm(torch.as_tensor(x)), 1e-10, f"plan {mode}")


def test_state_dict_keys_follow_names():
    tm = seqc.compile(example("mamba.seq"), backend="torch", params={"n_layers": 2})
    g = tm.graph
    assert sorted(tm.state_dict()) == sorted(g.weight_shapes())
    mixer = tm.get_submodule("layers.1.mixer")
    assert tuple(mixer.A_log.shape) == (128, 16)
    assert tm.get_submodule("layers.0.mixer.in_proj").weight.shape == (256, 64)
    assert tm.get_submodule("layers.0.norm").weight.shape == (64,)


def test_numpy_backend_rejects_bad_weights_and_inputs(rng):
    ref = seqc.compile(example("s4d.seq"), backend="numpy", params={"d_model": 4, "d_state": 4})
    w = dict(ref.weights)
    del w["ssm.D"]
    with pytest.raises(seqc.SeqcError, match="missing"):
        ref(rng.standard_normal((1, 3, 4)), w)
    with pytest.raises(seqc.SeqcError, match="dimension 2 must be 4"):
        ref(rng.standard_normal((1, 3, 5)), ref.weights)


def test_compile_rejects_unknown_backend_and_mode():
    with pytest.raises(seqc.SeqcError, match="did you mean 'torch'"):
        seqc.compile(example("s4d.seq"), backend="troch")
    with pytest.raises(seqc.SeqcError, match="unknown mode"):
        seqc.compile(example("s4d.seq"), mode="fft")


def test_plan_conv_is_refused_for_selective_ssm_in_spec():
    src = """model M() {
  input u: [B, L, 4]
  d, b, c = split(u, [4, 0 + 2, 2]) 
  return u
}"""
    with pytest.raises(seqc.SeqcError):
        seqc.build_graph(src)
    src = """model M() {
  input u: [B, L, 8]
  s = selective_ssm(u, u, u, u, d_state = 8, plan = conv)
  return s
}"""
    with pytest.raises(seqc.SeqcError, match="plan=conv is not available for selective_ssm") as e:
        seqc.compile(src)
    assert e.value.line == 3


def test_difftest_reports_agreement_and_localises_divergence(monkeypatch):
    report = seqc.difftest(example("mamba.seq"), params={"n_layers": 1})
    assert report.ok and report.first_divergence is None
    assert {r.op for r in report.rows} >= {"selective_ssm", "conv1d", "linear"}
    # break the torch runtime's rmsnorm: the report must point at the first rmsnorm node
    from seqc.backends.torch import layers
    orig = layers.RMSNorm.forward
    monkeypatch.setattr(layers.RMSNorm, "forward", lambda self, x, **kw: orig(self, x, **kw) * 1.001)
    report = seqc.difftest(example("mamba.seq"), params={"n_layers": 1})
    assert not report.ok
    assert report.first_divergence.op == "rmsnorm" and report.first_divergence.name == "layers.0.norm"


def test_numpy_lengths_equal_each_sequence_alone_and_match_torch(rng):
    ref = seqc.compile(example("mamba.seq"), backend="numpy", params={"n_layers": 1})
    tm = seqc.compile(example("mamba.seq"), params={"n_layers": 1}).double().load_numpy(ref.weights)
    x = rng.standard_normal((3, 9, 64))
    lengths = np.array([9, 3, 6])
    y, state = ref(x, ref.weights, lengths=lengths, return_state=True)
    for b, n in enumerate(lengths):
        alone = ref(x[b:b + 1, :n], ref.weights)
        assert_agree(alone[0], y[b, :n], 1e-12)
        assert np.all(y[b, n:] == 0)
    yt, st = tm(torch.as_tensor(x), lengths=torch.as_tensor(lengths), return_state=True)
    for b, n in enumerate(lengths):
        assert_agree(y[b, :n], yt[b, :n], 1e-10)
    for key in state:
        for k in state[key]:
            assert_agree(state[key][k], st[key][k], 1e-10, f"state {key}.{k}")
    with pytest.raises(seqc.SeqcError, match="lengths"):
        ref(x, ref.weights, lengths=np.array([10, 1, 1]))


def test_auto_plan_is_chosen_per_call_from_the_shapes(rng, monkeypatch):
    # without the numba kernels the inference plan depends on the length (recurrence, then conv)
    monkeypatch.setenv("SEQC_NO_NUMBA", "1")
    from seqc.passes import PlanContext
    from seqc.passes.planner import choose
    params = {"d_model": 8, "d_state": 8}
    ref = seqc.compile(example("s4d.seq"), backend="numpy", params=params)
    tm = seqc.compile(example("s4d.seq"), params=params).double().load_numpy(ref.weights)
    ssm = tm.get_submodule("ssm")
    assert ssm.plan == "auto"
    node = next(n for n in tm.graph.order() if n.op == "ssm")
    seen = set()
    for length in (8, 4096):
        x = rng.standard_normal((1, length, 8))
        with torch.no_grad():
            y = tm(torch.as_tensor(x))
        want = choose(node, PlanContext(batch=1, length=length, training=False))[1].plan
        assert ssm.last_plan == want
        seen.add(ssm.last_plan)
        assert_agree(ref(x, ref.weights), y, 1e-10, f"auto plan at L={length}")
    assert len(seen) == 2, "the cost model should pick different faces for 8 and 4096 tokens"
    # a length given at compile time fixes the plan
    assert seqc.compile(example("s4d.seq"), params=params, length=8).get_submodule("ssm").plan != "auto"
