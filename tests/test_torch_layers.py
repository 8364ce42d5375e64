"""The torch runtime layers (backends/torch/layers.py, functional.py) against independent
references: torch.nn.LSTM, scaled_dot_product_attention, closed-form SSM kernels, explicit
loops, the float64 NumPy oracle, and autograd's gradcheck."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.func import functional_call

from seqc import SeqcError
from seqc.backends.numpy import ops as np_ops
from seqc.backends.torch import functional as fn
from seqc.backends.torch.layers import LAYERS, SSM, Attention, Conv1d, LinearSystem, LSTM, SelectiveSSM, linear_scan
from seqc.registry import OPS

F64 = torch.float64
KINDS = ("diag", "dense", "s5", "shift")


# -- builders ----------------------------------------------------------------------------------


def _ssm_attrs(kind, **extra):
    return {"d_state": 4, "kind": kind, "init": "hippo-legs" if kind == "dense" else "s4d-lin", **extra}


def _randomise(m, seed=0):
    """Random weights, with SSM eigenvalues kept stable (Re < 0) and steps moderate."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        if isinstance(m, SSM):
            for name in ("log_dt", "log_step"):
                if hasattr(m, name):
                    getattr(m, name).add_(math.log(0.3))
            if hasattr(m, "Lambda_re"):
                m.Lambda_re.copy_(-torch.exp(m.Lambda_re))
            if hasattr(m, "A"):
                m.A.sub_(torch.eye(m.A.shape[0], dtype=m.A.dtype))
    return m


def make(op, in_features, attrs, dtype=F64, seed=0):
    return _randomise(LAYERS[op](in_features, attrs), seed).to(dtype)


CASES = {
    "conv1d": ("conv1d", [3], {"kernel": 3, "activation": "silu"}, None),
    **{f"ssm-{k}-{plan}": ("ssm", [3], _ssm_attrs(k), plan) for k in KINDS for plan in ("conv", "scan")},
    "selective": ("selective_ssm", [3, 3, 4, 4, 3], {"d_state": 4, "delta_bias": True}, None),
    "selective-recurrent": ("selective_ssm", [3, 3, 4, 4, 3], {"d_state": 4, "delta_bias": True}, "recurrent"),
    "lstm": ("lstm", [3], {"hidden": 4, "layers": 2}, None),
    "attention": ("attention", [4], {"heads": 2, "bias": True}, None),
    "attention-gqa-rope": ("attention", [6], {"heads": 4, "kv_heads": 2, "head_dim": 2, "rope": True}, None),
    "attention-window": ("attention", [4], {"heads": 2, "kv_heads": 1, "rope": True, "rope_theta": 50.0,
                                            "window": 3, "bias": True}, None),
}


def build(case, dtype=F64):
    op, feats, attrs, plan = CASES[case]
    m = make(op, feats, attrs, dtype)
    if plan is not None:
        m.plan = plan
    return m, feats


def inputs(feats, batch=2, length=7, dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, length, f, generator=g, dtype=F64).to(dtype) for f in feats]


def assert_states_close(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol)


TIGHT = dict(rtol=1e-10, atol=1e-10)


# -- functional ------------------------------------------------------------------------------


def test_functional_ops():
    x, g = torch.randn(2, 3, 6, dtype=F64), torch.randn(2, 3, 6, dtype=F64)
    assert set(fn.FUNCTIONS) == {n for n, s in OPS.items() if not s.has_weights and not s.stateful}
    torch.testing.assert_close(fn.FUNCTIONS["gate"](x, g, act="silu"), x * g / (1 + torch.exp(-g)))
    glu = fn.FUNCTIONS["glu"](x, act="sigmoid", unused=1)
    torch.testing.assert_close(glu, x[..., :3] / (1 + torch.exp(-x[..., 3:])))
    torch.testing.assert_close(fn.gelu(x), 0.5 * x * (1 + torch.erf(x / math.sqrt(2))))
    assert [t.shape[-1] for t in fn.split(x, sizes=3)] == [2, 2, 2]
    a, b = fn.split(x, sizes=[1, 5])
    torch.testing.assert_close(fn.concat(a, b), x)
    assert torch.equal(fn.dropout(x, p=0.5), x)
    assert not torch.equal(fn.dropout(x, p=0.5, training=True), x)
    with pytest.raises(SeqcError):
        fn.split(x, sizes=4)


# -- registry names ----------------------------------------------------------------------------


def _published_layout(case):
    """Parameter shapes written out from each layer's published layout (not from seqc's
    registry): torch.nn.Conv1d(groups=C), the S4D reference, S5 (Smith et al.: P = N/2
    complex modes, B (P, H) and C (H, P) as (re, im) pairs), mamba_ssm's selective scan,
    torch.nn.LSTM and a multi-head attention with q/k/v/o projections."""
    H, N, P = 3, 4, 2
    ssm = {"diag": {"log_dt": (H,), "log_A_real": (H, N // 2), "A_imag": (H, N // 2), "C": (H, N // 2, 2),
                    "D": (H,)},
           "dense": {"log_dt": (H,), "A": (N, N), "B": (H, N), "C": (H, N), "D": (H,)},
           "s5": {"log_step": (P,), "Lambda_re": (P,), "Lambda_im": (P,), "B": (P, H, 2), "C": (H, P, 2),
                  "D": (H,)},
           "shift": {"C": (H, N), "D": (H,)}}
    if case.startswith("ssm-"):
        return ssm[case.split("-")[1]]
    hidden, d_in, d = 4, 3, 4
    lstm = {}
    for k in range(2):
        lstm |= {f"weight_ih_l{k}": (4 * hidden, d_in if k == 0 else hidden), f"weight_hh_l{k}": (4 * hidden, hidden),
                 f"bias_ih_l{k}": (4 * hidden,), f"bias_hh_l{k}": (4 * hidden,)}
    return {"conv1d": {"weight": (3, 1, 3), "bias": (3,)},
            "selective": {"A_log": (3, 4), "D": (3,), "delta_bias": (3,)},
            "selective-recurrent": {"A_log": (3, 4), "D": (3,), "delta_bias": (3,)},
            "lstm": lstm,
            "attention": {f"{p}_proj.{w}": (d, d) if w == "weight" else (d,) for p in "qkvo"
                          for w in ("weight", "bias")}}[case]


@pytest.mark.parametrize("case", sorted(CASES))
def test_parameters_follow_the_registry(case):
    """The layer's parameters, the registry's weight rule, and the published layout agree."""
    op, feats, attrs, _ = CASES[case]
    m = LAYERS[op](feats, attrs)
    spec = OPS[op]
    full = {a.name: a.default for a in spec.attrs if a.name not in attrs} | attrs
    expected = spec.weights([(1, 1, f) for f in feats], full)
    published = _published_layout(case)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == published
    assert {k: tuple(v) for k, v in expected.items()} == published
    if op == "lstm":    # and torch's own LSTM agrees with the table
        ref = torch.nn.LSTM(3, 4, num_layers=2, batch_first=True)
        assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == published


# -- LSTM ----------------------------------------------------------------------------------------


def test_lstm_matches_torch_nn_lstm():
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 5, num_layers=2, batch_first=True).double()
    m = LSTM([3], {"hidden": 5, "layers": 2}).double()
    m.load_state_dict(ref.state_dict())
    x, h0, c0 = torch.randn(2, 6, 3, dtype=F64), torch.randn(2, 2, 5, dtype=F64), torch.randn(2, 2, 5, dtype=F64)
    y_ref, (h_ref, c_ref) = ref(x, (h0, c0))
    y, s = m(x, state={"h": h0.transpose(0, 1), "c": c0.transpose(0, 1)}, return_state=True)
    torch.testing.assert_close(y, y_ref, **TIGHT)
    torch.testing.assert_close(s["h"], h_ref.transpose(0, 1), **TIGHT)
    torch.testing.assert_close(s["c"], c_ref.transpose(0, 1), **TIGHT)


# -- attention -----------------------------------------------------------------------------------


def test_attention_matches_sdpa_and_steps_with_cache():
    m, _ = build("attention")
    (x,) = inputs([4])
    heads = lambda t: t.view(2, 7, 2, 2).transpose(1, 2)  # noqa: E731
    q, k, v = (heads(F.linear(x, getattr(m, p).weight, getattr(m, p).bias)) for p in ("q_proj", "k_proj", "v_proj"))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 7, 4)
    ref = F.linear(ref, m.o_proj.weight, m.o_proj.bias)
    torch.testing.assert_close(m(x), ref, **TIGHT)
    state, ys = m.init_state(2, F64), []
    for t in range(7):
        y_t, state = m.step(x[:, t], state=state)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), ref, **TIGHT)
    torch.testing.assert_close(state["k"], k, **TIGHT)


# -- SSM: plans, kernels ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("disc", ("zoh", "bilinear"))
def test_ssm_conv_plan_equals_scan_plan_equals_steps(kind, disc):
    m = make("ssm", [3], _ssm_attrs(kind, disc=disc))
    (u,) = inputs([3], length=9)
    x0 = {"x": torch.randn_like(m.init_state(2, F64)["x"])}
    results = {}
    for plan in ("conv", "scan"):
        m.plan = plan
        results[plan] = m(u, state=x0, return_state=True)
    state, ys = x0, []
    for t in range(u.shape[1]):
        y_t, state = m.step(u[:, t], state=state)
        ys.append(y_t)
    for y, s in (results["conv"], (torch.stack(ys, 1), state)):
        torch.testing.assert_close(y, results["scan"][0], **TIGHT)
        assert_states_close(s, results["scan"][1], **TIGHT)


def _closed_form_kernel(m, kind, L):
    """The Vandermonde / matrix-power kernel of a ZOH system, written out here."""
    l = torch.arange(L, dtype=F64)
    if kind == "diag":
        A = torch.complex(-torch.exp(m.log_A_real), m.A_imag)
        dtA = torch.exp(m.log_dt)[:, None] * A
        C = torch.complex(m.C[..., 0], m.C[..., 1])
        return 2 * torch.einsum("hn,hnl->hl", C * (torch.exp(dtA) - 1) / A, torch.exp(dtA[..., None] * l)).real
    if kind == "s5":
        lam = torch.complex(m.Lambda_re, m.Lambda_im)
        step = torch.exp(m.log_step)
        Bbar = ((torch.exp(step * lam) - 1) / lam)[:, None] * torch.complex(m.B[..., 0], m.B[..., 1])
        C = torch.complex(m.C[..., 0], m.C[..., 1])
        return 2 * torch.einsum("op,pl,pi->oil", C, torch.exp(step[:, None] * lam[:, None] * l), Bbar).real
    if kind == "dense":
        K = torch.empty(m.C.shape[0], L, dtype=F64)
        for h, dt in enumerate(torch.exp(m.log_dt)):
            Abar = torch.linalg.matrix_exp(dt * m.A)
            Bbar = torch.linalg.solve(m.A, (Abar - torch.eye(len(m.A), dtype=F64)) @ m.B[h])
            for j in range(L):
                K[h, j] = m.C[h] @ torch.linalg.matrix_power(Abar, j) @ Bbar
        return K
    return F.pad(m.C, (0, L - m.C.shape[1]))


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_ssm_kernel_closed_form(kind):
    m = make("ssm", [3], _ssm_attrs(kind))
    torch.testing.assert_close(m.kernel(11), _closed_form_kernel(m, kind, 11), **TIGHT)


@pytest.mark.parametrize("transition", ("diag", "matrix", "shift"))
@pytest.mark.parametrize("chunk", (None, 1, 3, 4, 10))
def test_linear_scan_chunks_equal_an_explicit_loop(transition, chunk):
    g = torch.Generator().manual_seed(3)
    b = torch.randn(2, 10, 3, 4, generator=g, dtype=F64)
    a = {"diag": 0.9 * torch.rand(3, 4, generator=g, dtype=F64),
         "matrix": 0.3 * torch.randn(3, 4, 4, generator=g, dtype=F64), "shift": 1}[transition]
    system = LinearSystem(a, transition, Bbar=None, C=None)
    x, ref = torch.zeros(2, 3, 4, dtype=F64), []
    for t in range(10):
        if transition == "diag":
            x = a * x
        elif transition == "matrix":
            x = torch.einsum("hij,bhj->bhi", a, x)
        else:
            x = torch.cat([torch.zeros_like(x[..., :1]), x[..., :-1]], -1)
        x = x + b[:, t]
        ref.append(x)
    torch.testing.assert_close(linear_scan(system, b, chunk), torch.stack(ref, 1), **TIGHT)


@torch.no_grad()
def test_ssm_conv_is_a_causal_convolution_with_the_kernel():
    m = make("ssm", [3], _ssm_attrs("diag"))
    m.plan = "conv"
    (u,) = inputs([3], length=6)
    K = _closed_form_kernel(m, "diag", 6)
    ref = torch.stack([sum(K[:, j] * u[:, t - j] for j in range(t + 1)) + m.D * u[:, t] for t in range(6)], 1)
    torch.testing.assert_close(m(u), ref, **TIGHT)


# -- streaming, variable length ----------------------------------------------------------------


def _run_steps(m, xs, state):
    ys = []
    for t in range(xs[0].shape[1]):
        y_t, state = m.step(*[x[:, t] for x in xs], state=state)
        ys.append(y_t)
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_two_chunks_equal_one_pass_and_steps(case):
    m, feats = build(case)
    warm = inputs(feats, length=3, seed=5)
    _, s0 = m(*warm, return_state=True)                  # a nonzero initial state
    xs = inputs(feats)
    y, s = m(*xs, state=s0, return_state=True)
    y1, s1 = m(*[x[:, :4] for x in xs], state=s0, return_state=True)
    y2, s2 = m(*[x[:, 4:] for x in xs], state=s1, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, **TIGHT)
    assert_states_close(s2, s, **TIGHT)
    y_steps, s_steps = _run_steps(m, xs, s0)
    torch.testing.assert_close(y_steps, y, **TIGHT)
    assert_states_close(s_steps, s, **TIGHT)


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_lengths_equal_each_sequence_alone(case):
    m, feats = build(case)
    _, s0 = m(*inputs(feats, batch=3, length=2, seed=5), return_state=True)
    xs, lengths = inputs(feats, batch=3), [7, 3, 1]
    y, s = m(*xs, state=s0, return_state=True, lengths=torch.tensor(lengths))
    more = inputs(feats, batch=3, length=2, seed=9)
    y_next = m(*more, state=s)
    for b, n in enumerate(lengths):
        one = lambda ts, lo=0, hi=None: [t[b:b + 1, lo:hi] for t in ts]  # noqa: E731
        s0_b = {k: v[b:b + 1] for k, v in s0.items()}
        y_b, s_b = m(*one(xs, 0, n), state=s0_b, return_state=True)
        torch.testing.assert_close(y[b:b + 1, :n], y_b, **TIGHT)
        if "valid" not in s:   # attention keeps padding in its cache, masked: check by continuing
            assert_states_close({k: v[b:b + 1] for k, v in s.items()}, s_b, **TIGHT)
        torch.testing.assert_close(y_next[b:b + 1], m(*one(more), state=s_b), **TIGHT)


# -- gradients -----------------------------------------------------------------------------------


def _gradcheck_with_state(m, xs, state):
    """gradcheck through inputs, the initial state and every parameter."""
    names = [n for n, _ in m.named_parameters()]
    keys = sorted(state)
    leaves = [t.detach().clone().requires_grad_() for t in
              [*xs, *(state[k] for k in keys), *(p for _, p in m.named_parameters())]]

    def f(*flat):
        x, s, p = flat[:len(xs)], flat[len(xs):len(xs) + len(keys)], flat[len(xs) + len(keys):]
        y, out = functional_call(m, dict(zip(names, p)), tuple(x), {"state": dict(zip(keys, s)), "return_state": True})
        return (y, *(out[k] for k in keys))
    assert gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-6)


GRAD_CASES = [c for c in CASES if c.startswith(("ssm", "attention"))] + ["conv1d", "lstm", "selective"]


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck(case):
    m, feats = build(case)
    if case == "lstm":
        m = make("lstm", [2], {"hidden": 2, "layers": 2})
        feats = [2]
    with torch.no_grad():
        _, s0 = m(*inputs(feats, batch=1, length=2, seed=5), return_state=True)
    _gradcheck_with_state(m, inputs(feats, batch=1, length=4), s0)


# -- half precision ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["ssm-diag-conv", "ssm-s5-scan", "ssm-dense-scan", "selective",
                                  "conv1d", "lstm", "attention"])
@torch.no_grad()
def test_bfloat16(case):
    m, feats = build(case, dtype=torch.float32)
    xs = inputs(feats, dtype=torch.float32)
    y32, s32 = m(*xs, return_state=True)
    if case.startswith(("ssm", "selective")):   # bf16 inputs and autocast: states accumulate in float32
        y, s = m(*[x.bfloat16() for x in xs], return_state=True)
        assert all(v.dtype == torch.float32 for v in s.values())
        assert m.init_state(2, torch.bfloat16)["x"].dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_auto = m(*xs)
        torch.testing.assert_close(y_auto.float(), y32, rtol=0, atol=1e-5)
    else:
        y, s = m.bfloat16()(*[x.bfloat16() for x in xs], return_state=True)
    assert y.dtype == torch.bfloat16
    # about 3x the worst error measured over input seeds 1..5, relative to max|y32| (bf16's ulp is 3.9e-3)
    tol = {"ssm-diag-conv": 1e-2, "ssm-s5-scan": 1e-2, "ssm-dense-scan": 1.5e-2, "selective": 1.5e-2,
           "conv1d": 3e-2, "lstm": 1.5e-2, "attention": 4e-2}[case]
    assert (y.float() - y32).abs().max() <= tol * y32.abs().max()


# -- agreement with the NumPy oracle ----------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_agrees_with_numpy_oracle(case):
    op, feats, attrs, _ = CASES[case]
    m, feats = build(case)
    _, s0 = m(*inputs(feats, length=2, seed=5), return_state=True)
    xs = inputs(feats)
    y, s = m(*xs, state=s0, return_state=True)
    weights = {k: v.numpy() for k, v in m.state_dict().items()}
    y_np, s_np = getattr(np_ops, op)(*[x.numpy() for x in xs], p=weights,
                                    state={k: v.numpy() for k, v in s0.items()}, **attrs)
    np.testing.assert_allclose(y.numpy(), y_np, rtol=1e-10, atol=1e-10)
    for k in s:
        np.testing.assert_allclose(s[k].numpy(), s_np[k], rtol=1e-10, atol=1e-10)


# -- user mistakes ---------------------------------------------------------------------------------


def test_user_mistakes_raise_seqc_error():
    with pytest.raises(SeqcError):
        SSM([3], _ssm_attrs("diag", d_state=5))
    with pytest.raises(SeqcError):
        Attention([6], {"heads": 4})
    with pytest.raises(SeqcError):
        Conv1d([3], {"kernel": 3})(torch.zeros(2, 4, 3), lengths=torch.tensor([5, 1]))
    with pytest.raises(SeqcError):
        SelectiveSSM([3, 3, 16, 16], {})(*inputs([3, 3, 16, 16], dtype=torch.float32), lengths=[1.5, 2.0])
