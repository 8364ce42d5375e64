"""Scalar x tensor arithmetic, tensor '/', exp / sqrt / softmax / rms, reductions over
time and features, and weight tying: NumPy references against formulas written here,
torch against the references (values, step, lengths=, gradients), fmt round trips and
located errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import seqc
from conftest import assert_agree
from seqc.fmt import format_source

RNG = np.random.default_rng(7)


def _pair(src, **kw):
    ref = seqc.compile(source=src, backend="numpy", **kw)
    tm = seqc.compile(source=src, backend="torch", **kw).double().load_numpy(ref.weights)
    return ref, tm


ARITH = """model A(d = 5) {
  input x: [B, L, d]
  input y: [B, L, d]
  return 0.5 * x, x * 2, x / 4, 1 - x, x + 3, x - 2, x / y, exp(x), sqrt(y * y), softmax(x), rms(x, eps = 0.25)
}
"""


def test_scalar_tensor_arithmetic_and_math_ops_match_formulas():
    ref, tm = _pair(ARITH)
    x, y = RNG.standard_normal((2, 4, 5)), RNG.standard_normal((2, 4, 5)) + 3.0
    want = [0.5 * x, 2 * x, x / 4, 1 - x, x + 3, x - 2, x / y, np.exp(x), np.abs(y),
            np.exp(x) / np.exp(x).sum(-1, keepdims=True), x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 0.25)]
    got_np = ref(x, y, ref.weights)
    got_t = tm(torch.as_tensor(x), torch.as_tensor(y))
    for w, a, b in zip(want, got_np, got_t):
        assert_agree(w, a, 1e-14)
        assert_agree(w, b, 1e-14)
    # float32 torch within float32 rounding of the float64 reference
    tm32 = seqc.compile(source=ARITH, backend="torch")
    for w, b in zip(want, tm32(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32))):
        assert_agree(w, b, 2e-6)
    ops = [n.op for n in seqc.build_graph(source=ARITH).nodes.values()]
    assert ops.count("affine") == 6 and "div" in ops


@pytest.mark.parametrize("expr, msg", [
    ("2 / x", "a number by a tensor is not supported"),
    ("x / 0", "division of a tensor by zero"),
    ("x ** 2", "'\\*\\*' between a tensor and a number"),
    ("x // 2", "'//' between a tensor and a number"),
    ("x * true", "a tensor combines with a tensor or a number"),
    ("t * 2", "needs a float tensor; this one holds integer tokens"),
    ("t / x", "needs float tensors"),
    ("x % x", "tensors combine with"),
])
def test_misuse_is_a_located_error(expr, msg):
    src = f"model M(d = 4) {{\n  input x: [B, L, d]\n  input t: [B, L] int\n  y = {expr}\n  return y\n}}\n"
    with pytest.raises(seqc.SeqcError, match=msg) as e:
        seqc.build_graph(source=src)
    assert e.value.span is not None and e.value.span.line == 4


REDUCE = """model R(d = 4) {
  input x: [B, L, d]
  return mean(x, dim = time), sum(x, dim = time), max(x, dim = time), mean(x, dim = features), sum(x, dim = features), max(x, dim = features), last(x, dim = time), last(x, dim = features)
}
"""


def _reduce_formulas(x):
    n = np.arange(1, x.shape[1] + 1)[None, :, None]
    return [np.cumsum(x, 1) / n, np.cumsum(x, 1), np.maximum.accumulate(x, 1),
            x.mean(-1, keepdims=True), x.sum(-1, keepdims=True), x.max(-1, keepdims=True), x, x[..., -1:]]


def test_reductions_match_formulas_step_and_streaming():
    ref, tm = _pair(REDUCE)
    x = RNG.standard_normal((3, 6, 4))
    want = _reduce_formulas(x)
    for w, a, b in zip(want, ref(x, ref.weights), tm(torch.as_tensor(x))):
        assert_agree(w, a, 1e-14)
        assert_agree(w, b, 1e-14)
    xt = torch.as_tensor(x)
    state, steps = tm.init_state(3), []
    for t in range(6):
        y_t, state = tm.step(xt[:, t], state)
        steps.append(y_t)
    for k, w in enumerate(want):
        assert_agree(w, torch.stack([s[k] for s in steps], 1), 1e-14, f"step output {k}")
    first, mid = tm(xt[:, :2], return_state=True)       # two chunks with the state handed over
    second, _ = tm(xt[:, 2:], state=mid, return_state=True)
    for k, w in enumerate(want):
        assert_agree(w, torch.cat([first[k], second[k]], 1), 1e-14, f"chunked output {k}")


POOLED = """model P(d = 4) {
  input x: [B, L, d]
  mean = mean(x, dim = time)
  max = max(x, dim = time)
  sum = sum(x, dim = time)
  last = last(x)
  return mean + max + sum + last + linear(max(x, dim = features), d) / 2
}
"""


def test_reductions_with_lengths_and_gradients():
    ref, tm = _pair(POOLED)
    x = RNG.standard_normal((3, 6, 4))
    lengths = np.array([6, 2, 0])
    y_np, s_np = ref(x, ref.weights, lengths=lengths, return_state=True)
    xt = torch.as_tensor(x).requires_grad_()
    y_t, s_t = tm(xt, lengths=torch.as_tensor(lengths), return_state=True)
    for b, n in enumerate(lengths):
        assert_agree(y_np[b, :n], y_t[b, :n], 1e-14)
    for key, st in s_np.items():
        for k, v in st.items():
            assert_agree(v, s_t[key][k], 1e-14, f"final state {key}.{k}")
    # the final state of a time reduction is the reduction over each row's own length
    assert_agree(x[1, :2].mean(0), s_t["mean"]["sum"][1] / s_t["mean"]["count"][1], 1e-14)
    assert_agree(x[1, :2].max(0), s_t["max"]["max"][1], 1e-14)
    assert_agree(x[1, 1], s_t["last"]["last"][1], 1e-14)              # last-token pooling respects lengths
    assert_agree(x[0, 5], s_t["last"]["last"][0], 1e-14)
    assert float(s_t["last"]["last"][2].detach().abs().max()) == 0.0
    assert float(s_t["sum"]["sum"][2].detach().abs().max()) == 0.0 and float(s_t["max"]["count"][2]) == 0.0
    # gradient of the last running mean: 1/L to every position
    _, tm_all = _pair(REDUCE)
    xt = torch.as_tensor(x).requires_grad_()
    tm_all(xt)[0][0, -1].sum().backward()
    assert_agree(np.full((6, 4), 1 / 6), xt.grad[0], 1e-14)


TIED = """model T(vocab = 11, d = 6) {
  input tokens: [B, L] int
  embeddings = embedding(tokens, vocab = vocab, dim = d)
  h = rmsnorm(embeddings)
  lm_head = linear(h, vocab, bias = false, tie = embeddings)
  return lm_head
}
"""


def test_weight_tying_is_one_parameter_on_both_backends():
    ref, tm = _pair(TIED)
    assert set(ref.weights) == {"embeddings.weight", "h.weight"} == set(tm.state_dict())
    assert tm.lm_head.weight is tm.embeddings.weight
    tokens = RNG.integers(0, 11, (2, 5))
    E, g = ref.weights["embeddings.weight"], ref.weights["h.weight"]
    h = E[tokens]
    want = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + 1e-5) * g @ E.T
    assert_agree(want, ref(tokens, ref.weights), 1e-13)
    assert_agree(want, tm(torch.as_tensor(tokens)), 1e-13)
    # gradients from both uses accumulate in the one parameter
    tm(torch.as_tensor(tokens)).sum().backward()
    assert tm.embeddings.weight.grad is not None and tm.embeddings.weight.grad.abs().sum() > 0
    tm32 = tm.float()                      # .to() converts the shared parameter once
    assert tm32.lm_head.weight.dtype == torch.float32 and tm32.lm_head.weight is tm32.embeddings.weight


@pytest.mark.parametrize("tie, msg", [
    ("x", "not a layer with weights"),
    ("3", "must name a layer by its value"),
    ("norm", r"cannot tie to 'norm': its weight is \(6,\) but this linear needs \(11, 6\)"),
    ("proj", r"its weight is \(6, 6\) but this linear needs \(11, 6\)"),
])
def test_bad_ties_are_located_errors(tie, msg):
    src = TIED.replace("  h = rmsnorm(embeddings)\n",
                       "  h = rmsnorm(embeddings)\n  norm = rmsnorm(h)\n  proj = linear(norm, d)\n  x = h + proj\n") \
              .replace("tie = embeddings", f"tie = {tie}")
    with pytest.raises(seqc.SeqcError, match=msg) as e:
        seqc.build_graph(source=src)
    assert e.value.span is not None and e.value.span.line == 8


def test_new_syntax_round_trips_through_fmt():
    for src in (ARITH, REDUCE, TIED):
        text = format_source(src)
        assert format_source(text) == text
        a, b = seqc.build_graph(source=src), seqc.build_graph(source=text)
        assert [(n.op, n.attrs) for n in a.order()] == [(n.op, n.attrs) for n in b.order()]


GRAD = """model G(d = 4) {
  input x: [B, L, d]
  a = softmax(x) * exp(x / 2) + sqrt(x * x + 1) - rms(x)
  b = mean(a, dim = time) + max(x, dim = time) + 0.5 * last(x, dim = time)
  return b / (2 + x * x) + linear(sum(b, dim = features), d)
}
"""


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, 1e-5)])   # measured 4e-10, 5e-8
def test_torch_gradients_match_finite_differences_of_the_reference(dtype, tol):
    ref = seqc.compile(source=GRAD, backend="numpy")
    tm = seqc.compile(source=GRAD, backend="torch").to(dtype).load_numpy(ref.weights)
    x = RNG.standard_normal((1, 3, 4))
    w = RNG.standard_normal((1, 3, 4))
    xt = torch.as_tensor(x, dtype=dtype).requires_grad_()
    (tm(xt) * torch.as_tensor(w, dtype=dtype)).sum().backward()
    h, fd = 1e-6, np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        fd[i] = ((ref(x + e, ref.weights) - ref(x - e, ref.weights)) * w).sum() / (2 * h)
    assert_agree(fd, xt.grad, tol)


def test_enum_value_wins_over_a_dimension_of_the_same_name():
    """Found by the fuzzer: `input x: [batch, time, 4]` makes `time` a dimension symbol;
    `dim = time` still means the attribute value."""
    g = seqc.build_graph(source="model M() {\n  input x: [batch, time, 4]\n  return mean(x, dim = time)\n}\n")
    assert [n.attrs for n in g.order() if n.op == "mean"] == [{"dim": "time"}]
