"""direction = bidirectional (seqc/ops/_direction.py, backends/torch/bidirectional.py) on ssm,
selective_ssm and rglru: equal to a causal layer plus a causal layer with the reverse.* weights run
over the time-reversed sequence (built here from causal layers), in both backends and every plan;
non-causal (the first output depends on the last input); lengths= reverses each row within its
length; step and carried state are refused with a SeqcError."""
from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch

import seqc
from conftest import assert_agree
from seqc.backends.numpy import ops as np_ops
from seqc.backends.torch.base import LAYERS

SPEC = """model Bi(d_model = 6) {
  input x: [B, L, d_model]
  in_proj = linear(x, 4 * d_model, bias = false)
  u, dt, z = split(in_proj, [d_model, d_model, 2 * d_model])
  bc = linear(x, 8)
  Bt, Ct = split(bc, 2)
  s = selective_ssm(u, delta = dt, B = Bt, C = Ct, d_state = 4, delta_bias = true, direction = bidirectional)
  lti = ssm(s, d_state = 4, direction = bidirectional)
  r = rglru(lti, heads = 2, direction = bidirectional)
  return r
}"""

CASES = [("ssm", {"d_state": 4}, 1), ("selective_ssm", {"d_state": 3, "delta_bias": True}, 4),
         ("rglru", {"heads": 2}, 1)]


def _inputs(op, rng, batch=2, length=9, d=4):
    xs = [rng.standard_normal((batch, length, d))]
    if op == "selective_ssm":
        xs += [rng.standard_normal((batch, length, d)), rng.standard_normal((batch, length, 3)),
               rng.standard_normal((batch, length, 3))]
    return [torch.as_tensor(x) for x in xs]


def _layers(op, attrs, rng):
    """A bidirectional layer with random weights and two causal layers holding its forward / reverse weights."""
    bi = LAYERS[op]([4], {**attrs, "direction": "bidirectional"}).double()
    with torch.no_grad():
        for p in bi.parameters():
            p.copy_(torch.as_tensor(rng.normal(0, 0.5, p.shape)))
    sd = bi.state_dict()
    fwd, rev = LAYERS[op]([4], attrs).double(), LAYERS[op]([4], attrs).double()
    fwd.load_state_dict({k: v for k, v in sd.items() if not k.startswith("reverse.")})
    rev.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("reverse.")})
    return bi, fwd, rev


@pytest.mark.parametrize("op, attrs, n_in", CASES)
def test_sum_of_forward_and_time_reversed_causal_passes(op, attrs, n_in, rng):
    bi, fwd, rev = _layers(op, attrs, rng)
    xs = _inputs(op, rng)
    want = fwd(*xs) + rev(*(x.flip(1) for x in xs)).flip(1)
    for plan in ("scan", "recurrent") + (("conv",) if op == "ssm" else ()):
        bi.plan = plan
        assert_agree(want, bi(*xs), 1e-12, f"{op} {plan}")
    p = {k: v.numpy() for k, v in bi.state_dict().items()}
    y_np, _ = getattr(np_ops, op)(*(x.numpy() for x in xs), p=p, **attrs, direction="bidirectional")
    assert_agree(want, y_np, 1e-12, f"{op} numpy")
    if op == "selective_ssm":      # the gate z, given by keyword, is reversed with the other inputs
        z = torch.as_tensor(rng.standard_normal(xs[0].shape))
        want = fwd(*xs, z) + rev(*(x.flip(1) for x in xs), z.flip(1)).flip(1)
        assert_agree(want, bi(*xs, z), 1e-12, "gated")
        y_np, _ = np_ops.selective_ssm(*(x.numpy() for x in xs), z=z.numpy(), p=p, **attrs, direction="bidirectional")
        assert_agree(want, y_np, 1e-12, "gated numpy")
    # non-causal: the first output moves with the last input (a causal layer's does not)
    x = xs[0].clone().requires_grad_(True)
    g = torch.autograd.grad(bi(x, *xs[1:])[:, 0].sum(), x)[0]
    assert float(g[:, -1].abs().max()) > 1e-8
    g = torch.autograd.grad(fwd(x, *xs[1:])[:, 0].sum(), x)[0]
    assert float(g[:, -1].abs().max()) == 0.0


@pytest.mark.parametrize("op, attrs, n_in", CASES)
def test_lengths_reverse_each_row_within_its_length(op, attrs, n_in, rng):
    bi, _, _ = _layers(op, attrs, rng)
    xs = _inputs(op, rng, batch=3)
    lengths = torch.tensor([9, 4, 1])
    y = bi(*xs, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        alone = bi(*(x[b:b + 1, :n] for x in xs))
        assert_agree(alone[0], y[b, :n], 1e-12, f"{op} row {b}")


def test_compiled_model_agrees_across_backends_and_refuses_the_causal_face(rng):
    for mode in ("scan", "recurrent", "conv"):
        r = seqc.difftest(SPEC, modes=("auto", mode))
        assert r.ok, str(r)
    r = seqc.difftest(SPEC, backends=("torch", "torch"), modes=("scan", "recurrent"))
    assert r.ok and r.grad_abs is not None and r.grad_abs < 1e-10, str(r)
    m = seqc.compile(SPEC).double()
    assert {"s.reverse.A_log", "lti.reverse.log_dt", "r.reverse.recurrent_param"} <= set(m.state_dict())
    x = torch.as_tensor(rng.standard_normal((2, 5, 6)))
    with pytest.raises(seqc.SeqcError, match="bidirectional"):
        m(x, return_state=True)
    with pytest.raises(seqc.SeqcError, match="bidirectional"):
        m.step(x[:, 0], m.init_state(2))
    twin = copy.deepcopy(m)                               # copies compute with their own weights
    with torch.no_grad():
        twin.get_submodule("r.reverse").recurrent_param.add_(1.0)
    assert not torch.allclose(twin(x), m(x))
    assert type(m.get_submodule("r")).__name__ == "BidirectionalRGLRU"
    ref = seqc.compile(SPEC, backend="numpy")
    with pytest.raises(seqc.SeqcError, match="bidirectional"):
        ref.init_state(2)
    # the initialiser draws the reverse weights independently
    w = ref.weights
    assert w["r.reverse.recurrent_param"].shape == w["r.recurrent_param"].shape
    assert not np.allclose(w["r.reverse.recurrent_param"], w["r.recurrent_param"])


def test_unknown_direction_is_a_located_error():
    src = "model M() {\n input x: [B, L, 4]\n r = rglru(x, direction = both)\n return r\n}"
    with pytest.raises(seqc.SeqcError) as err:
        seqc.build_graph(src)
    assert err.value.line == 3


@pytest.mark.skipif("dtype" not in inspect.signature(seqc.difftest).parameters,
                    reason="this seqc.difftest has no dtype= (it arrives with the issue-8 merge)")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_difftest_numpy_vs_torch_per_dtype_with_gradients(dtype):
    report = seqc.difftest(SPEC, dtype=dtype)
    assert report.ok and report.grad_abs is not None, str(report)
