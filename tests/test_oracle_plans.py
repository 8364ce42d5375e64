"""The NumPy reference's execution plans (seqc/ops/ssm.py, seqc/ops/selective_ssm.py): the
convolution and chunked-scan forms are separate computations that must equal the step-by-step
recurrence (float64, to 1e-12) - outputs, initial states and final states - and the
convolution kernel must be the closed form of the S4D paper; a custom `discretize=` callable
replaces the derived discretization; `difftest` can compare two plans of the oracle."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import seqc
from conftest import example
from seqc.backends.numpy import ops
from seqc.init import init_layer
from seqc.ops import OPS

TOL = 1e-12
L = 21              # not a multiple of the reference scan's chunk of 8


def weights(op, in_shape, rng, **attrs):
    a = {**OPS[op].defaults, **attrs}
    shapes = {k: tuple(int(d) for d in s) for k, s in OPS[op].weights((in_shape,), a).items()}
    return {k: w + 0.1 * rng.standard_normal(w.shape) for k, w in init_layer(op, shapes, a, rng).items()}


def close(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, what
    err = float(np.abs(a - b).max(initial=0)) / max(1.0, float(np.abs(a).max(initial=0)))
    assert err <= TOL, f"{what}: relative error {err:.3g}"


SSM_CASES = [(k, d) for k, d in itertools.product(("diag", "dense", "s5"), ("zoh", "bilinear", "euler",
                                                                            "backward_euler"))] + [("shift", "zoh")]


@pytest.mark.parametrize("kind, disc", SSM_CASES)
@pytest.mark.parametrize("plan", ["conv", "scan"])
def test_ssm_plans_equal_the_recurrence_with_states(kind, disc, plan, rng):
    a = dict(kind=kind, d_state=6, disc=disc, init="hippo-legs" if kind == "dense" else "s4d-lin")
    p = weights("ssm", (2, L, 3), rng, **a)
    u = rng.standard_normal((2, L, 3))
    x0 = {"x": rng.standard_normal(ops.ssm_init_state(2, p, **a)["x"].shape)}
    for state in (None, x0):
        y, final = ops.ssm(u, p=p, state=state, plan="recurrent", **a)
        y2, final2 = ops.ssm(u, p=p, state=state, plan=plan, **a)
        close(y, y2, f"{plan} output")
        close(final["x"], final2["x"], f"{plan} final state")
    # chunks of a stream: the plan's final state carries on exactly
    y_a, mid = ops.ssm(u[:, :9], p=p, state=x0, plan=plan, **a)
    y_b, end = ops.ssm(u[:, 9:], p=p, state=mid, plan=plan, **a)
    close(y, np.concatenate([y_a, y_b], 1), f"{plan} in two chunks")
    close(final["x"], end["x"], f"{plan} final state in two chunks")


def test_ssm_conv_kernel_is_the_s4d_closed_form(rng):
    """Impulse response of the conv plan = K[l] = 2 Re(sum_n C_n dB_n dA_n^l) with ZOH
    dA = exp(dt A), dB = (exp(dt A) - 1) / A, plus D at lag 0."""
    a = dict(kind="diag", d_state=8, disc="zoh")
    p = weights("ssm", (1, L, 2), rng, **a)
    A = -np.exp(p["log_A_real"]) + 1j * p["A_imag"]
    dt = np.exp(p["log_dt"])[:, None]
    dA, dB = np.exp(dt * A), (np.exp(dt * A) - 1) / A
    C = p["C"][..., 0] + 1j * p["C"][..., 1]
    K = np.stack([2 * (C * dB * dA ** lag).sum(-1).real for lag in range(L)])      # (L, H)
    K[0] += p["D"]
    u = np.zeros((1, L, 2))
    u[0, 0] = 1.0
    y, _ = ops.ssm(u, p=p, plan="conv", **a)
    close(K, y[0], "impulse response")


@pytest.mark.parametrize("disc", ["mamba", "zoh", "bilinear"])
def test_selective_scan_plan_equals_the_recurrence_with_states(disc, rng):
    a = dict(d_state=5, delta_bias=True, disc=disc)
    p = weights("selective_ssm", (2, L, 3), rng, **a)
    u, delta, B, C, z = (rng.standard_normal((2, L, k)) for k in (3, 3, 5, 5, 3))
    x0 = {"x": rng.standard_normal((2, 3, 5))}
    for state, gate in ((None, None), (x0, z)):
        y, final = ops.selective_ssm(u, delta, B, C, gate, p=p, state=state, plan="recurrent", **a)
        y2, final2 = ops.selective_ssm(u, delta, B, C, gate, p=p, state=state, plan="scan", **a)
        close(y, y2, "scan output")
        close(final["x"], final2["x"], "scan final state")


def test_plan_conv_is_refused_for_the_selective_scan_and_unknown_plans(rng):
    p = weights("selective_ssm", (1, 3, 2), rng, d_state=2)
    u, B = rng.standard_normal((1, 3, 2)), rng.standard_normal((1, 3, 2))
    with pytest.raises(seqc.SeqcError, match="no plan 'conv'"):
        ops.selective_ssm(u, u, B, B, p=p, plan="conv", d_state=2)
    with pytest.raises(seqc.SeqcError, match="no plan 'fft'"):
        ops.ssm(u, p=weights("ssm", (1, 3, 2), rng, d_state=4), plan="fft", d_state=4)


def test_discretize_callable_replaces_the_derived_one(rng):
    """A hand-written forward Euler (Abar = 1 + dt A, Bbar = dt B) equals disc=euler; a
    deliberately different rule changes the result (the callable is really used)."""
    def euler(A, B, dt):
        return 1 + dt * A, dt * B

    def euler_dense(A, B, dt):               # (N, N) A and B with per-channel dt (H,)
        dt = np.asarray(dt)[:, None, None]
        return np.eye(A.shape[0]) + dt * A, dt * B

    u = rng.standard_normal((2, L, 3))
    for kind in ("diag", "dense", "s5"):
        rule = euler_dense if kind == "dense" else euler
        a = dict(kind=kind, d_state=4, init="s4d-real")
        p = weights("ssm", (2, L, 3), rng, **a)
        want, _ = ops.ssm(u, p=p, disc="euler", **a)
        for plan in ("recurrent", "conv", "scan"):
            got, _ = ops.ssm(u, p=p, disc="zoh", discretize=rule, plan=plan, **a)
            close(want, got, f"{kind} {plan}")
        other, _ = ops.ssm(u, p=p, disc="zoh", discretize=lambda A, B, dt: rule(A, 2 * B, dt), **a)
        assert np.abs(other - want).max() > 1e-3
    p = weights("selective_ssm", (2, L, 3), rng, d_state=5)
    delta, B, C = (rng.standard_normal((2, L, k)) for k in (3, 5, 5))
    want, _ = ops.selective_ssm(u, delta, B, C, p=p, d_state=5, disc="zoh")
    for plan in ("recurrent", "scan"):            # ZOH for A and B by hand; `disc` is then ignored
        got, _ = ops.selective_ssm(u, delta, B, C, p=p, d_state=5, disc="mamba", plan=plan,
                                   discretize=lambda A, B_, dt: (np.exp(dt * A), np.expm1(dt * A) / A * B_))
        close(want, got, f"selective {plan}")


def test_difftest_compares_two_plans_of_the_oracle():
    report = seqc.difftest(example("s4d.seq"), backends=("numpy", "numpy"), modes=("conv", "scan"),
                           params={"d_model": 4, "d_state": 8})
    assert report.ok and report.output_abs < 1e-12, str(report)
    assert report.output_abs > 0            # two different computations, not one run twice
