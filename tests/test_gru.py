"""The gru op (seqc/ops/gru.py, backends/torch/ops/gru.py) against torch.nn.GRU with copied
weights - values, gradients, final states, several layers, packed lengths - and its NumPy
reference against both; step against forward; the initialiser's distribution; a spec using it
through compile / difftest."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import seqc
from conftest import assert_agree
from seqc.backends.numpy import ops as np_ops
from seqc.backends.torch.base import LAYERS
from seqc.init import init_layer
from seqc.ops import OPS

SPEC = """model G(d_model = 5, hidden = 6, layers = 2) {
  input x: [B, L, d_model]
  rnn = gru(x, hidden = hidden, layers = layers)
  return linear(rnn, d_model)
}"""


def _pair(d, hidden, layers, bias=True, seed=0):
    """A torch.nn.GRU and our layer holding the same (random) weights, float64."""
    torch.manual_seed(seed)
    ref = torch.nn.GRU(d, hidden, num_layers=layers, bias=bias, batch_first=True).double()
    ours = LAYERS["gru"]([d], {"hidden": hidden, "layers": layers, "bias": bias}).double()
    ours.load_state_dict(ref.state_dict())         # the same names and shapes: loads unchanged
    return ref, ours


@pytest.mark.parametrize("layers, bias", [(1, True), (2, True), (3, False)])
def test_torch_layer_matches_torch_nn_gru_values_states_gradients(layers, bias):
    ref, ours = _pair(3, 4, layers, bias)
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(layers, 2, 4, dtype=torch.float64)
    y_ref, h_ref = ref(x, h0)
    y, state = ours(x, state={"h": h0.transpose(0, 1)}, return_state=True)
    assert_agree(y_ref, y, 1e-13, "output")
    assert_agree(h_ref.transpose(0, 1), state["h"], 1e-13, "final state")
    w = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad((y_ref * w).sum() + h_ref.sum(), [x, *ref.parameters()])
    g = torch.autograd.grad((y * w).sum() + state["h"].sum(), [x, *ours.parameters()])
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]
    for a, b in zip(g_ref, g):
        assert_agree(a, b, 1e-12, "gradient")


def test_numpy_reference_matches_torch_nn_gru(rng):
    ref, _ = _pair(3, 4, 2, seed=3)
    p = {k: v.numpy() for k, v in ref.state_dict().items()}
    x, h0 = rng.standard_normal((2, 9, 3)), rng.standard_normal((2, 2, 4))
    y, state = np_ops.gru(x, p=p, state={"h": h0}, hidden=4, layers=2)
    y_ref, h_ref = ref(torch.as_tensor(x), torch.as_tensor(h0).transpose(0, 1).contiguous())
    assert_agree(y_ref, y, 1e-13, "output")
    assert_agree(h_ref.transpose(0, 1), state["h"], 1e-13, "final state")


def test_numpy_reference_is_the_gru_formula(rng):
    """One step by hand: r, z, n in torch's gate order, h' = (1 - z) n + z h."""
    d, h = 2, 3
    p = {"weight_ih_l0": rng.standard_normal((3 * h, d)), "weight_hh_l0": rng.standard_normal((3 * h, h)),
         "bias_ih_l0": rng.standard_normal(3 * h), "bias_hh_l0": rng.standard_normal(3 * h)}
    x, h0 = rng.standard_normal((1, 1, d)), rng.standard_normal((1, 1, h))
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    gi, gh = p["weight_ih_l0"] @ x[0, 0] + p["bias_ih_l0"], p["weight_hh_l0"] @ h0[0, 0] + p["bias_hh_l0"]
    r, z = sig(gi[:h] + gh[:h]), sig(gi[h:2 * h] + gh[h:2 * h])
    n = np.tanh(gi[2 * h:] + r * gh[2 * h:])
    want = (1 - z) * n + z * h0[0, 0]
    y, state = np_ops.gru(x, p=p, state={"h": h0}, hidden=h)
    np.testing.assert_allclose(y[0, 0], want, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(state["h"][0, 0], want, rtol=1e-14, atol=1e-14)


def test_step_equals_forward_in_both_backends(rng):
    _, ours = _pair(3, 4, 2, seed=1)
    p = {k: v.numpy() for k, v in ours.state_dict().items()}
    x = rng.standard_normal((2, 6, 3))
    y, final = ours(torch.as_tensor(x), return_state=True)
    state, ys = ours.init_state(2, torch.float64), []
    np_state, np_ys = np_ops.gru_init_state(2, p, hidden=4, layers=2), []
    for t in range(6):
        y_t, state = ours.step(torch.as_tensor(x[:, t]), state=state)
        ys.append(y_t)
        y_t, np_state = np_ops.gru_step(x[:, t], p=p, state=np_state, hidden=4, layers=2)
        np_ys.append(y_t)
    assert_agree(y, torch.stack(ys, 1), 1e-13, "torch step vs forward")
    assert_agree(final["h"], state["h"], 1e-13, "torch step state")
    assert_agree(y, np.stack(np_ys, 1), 1e-12, "numpy step vs torch forward")
    assert_agree(final["h"], np_state["h"], 1e-12, "numpy step state")


def test_lengths_run_each_sequence_alone_and_empty_rows_keep_their_state(rng):
    _, ours = _pair(3, 4, 2, seed=2)
    x = torch.as_tensor(rng.standard_normal((3, 6, 3)))
    h0 = torch.as_tensor(rng.standard_normal((3, 2, 4)))
    lengths = torch.tensor([6, 0, 2])
    y, state = ours(x, state={"h": h0}, return_state=True, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        if n:
            alone, s = ours(x[b:b + 1, :n], state={"h": h0[b:b + 1]}, return_state=True)
            assert_agree(alone[0], y[b, :n], 1e-13, f"row {b}")
        assert_agree(s["h"][0] if n else h0[b], state["h"][b], 1e-13, f"state of row {b}")
        assert not y[b, n:].any()
    with pytest.raises(seqc.SeqcError, match="lengths"):
        ours(x, lengths=torch.tensor([7, 1, 1]))


def test_initialiser_is_torch_default_uniform():
    shapes = {k: tuple(v) for k, v in OPS["gru"].weights([(1, 1, 5)], {"hidden": 64, "layers": 2, "bias": True}).items()}
    w = init_layer("gru", shapes, {"hidden": 64, "layers": 2}, np.random.default_rng(0))
    assert sorted(w) == sorted(torch.nn.GRU(5, 64, num_layers=2).state_dict())
    bound = 1 / 8
    for k, v in w.items():
        assert v.shape == shapes[k] and np.abs(v).max() <= bound
        assert np.abs(v).max() > 0.95 * bound           # spread over the whole interval
    allw = np.concatenate([v.ravel() for v in w.values()])
    assert abs(allw.mean()) < 0.01 * bound and abs(allw.std() - bound / np.sqrt(3)) < 0.02 * bound


def test_gru_in_a_spec_compiles_plans_and_agrees_across_backends(rng):
    g = seqc.build_graph(SPEC)
    assert "gru[" in g.dump()
    ref = seqc.compile(SPEC, backend="numpy")
    tm = seqc.compile(SPEC).double().load_numpy(ref.weights)
    assert tm.get_submodule("rnn").plan == "recurrent"
    torch_gru = torch.nn.GRU(5, 6, num_layers=2, batch_first=True).double()
    torch_gru.load_state_dict(tm.get_submodule("rnn").state_dict())
    x = rng.standard_normal((2, 5, 5))
    y, state = tm(torch.as_tensor(x), return_state=True)
    assert_agree(ref(x, ref.weights), y, 1e-12, "numpy vs torch")
    h_ref = torch_gru(torch.as_tensor(x))[1]
    assert_agree(h_ref.transpose(0, 1), state["rnn"]["h"], 1e-13, "state vs torch.nn.GRU")
    report = seqc.difftest(SPEC)
    assert report.ok and [r.op for r in report.rows] == ["gru", "linear"], str(report)
