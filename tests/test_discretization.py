"""Discretization: derived sympy forms, generated NumPy/torch code, and seqc.discretize.

References: scipy.signal.cont2discrete and scipy.linalg.expm (dense), mpmath at
50 digits (the ZOH input integral near A = 0), torch.autograd.gradcheck.
"""
import warnings

import mpmath
import numpy as np
import pytest
import scipy.linalg
import scipy.signal
import sympy as sp
import torch

from seqc.errors import SeqcError
from seqc import discretization as disc
from seqc.discretization import discretize, discretizer
from seqc.expm import expm

SCIPY_NAME = {"zoh": "zoh", "bilinear": "bilinear", "euler": "euler",
              "backward_euler": "backward_diff"}
STEPS = np.logspace(-4, 0, 5)


def stable_system(rng, n, m, complex_=False):
    A = rng.standard_normal((n, n))
    if complex_:
        A = A + 1j * rng.standard_normal((n, n))
    A -= (np.linalg.eigvals(A).real.max() + 0.5) * np.eye(n)
    return A, rng.standard_normal((n, m))


def scipy_reference(A, B, dt, method):
    Ad, Bd, *_ = scipy.signal.cont2discrete((A, B, np.eye(len(A)), 0), dt, SCIPY_NAME[method])
    return Ad, Bd


def random_diag(rng, n, complex_):
    a = -rng.uniform(0.1, 3.0, n)
    return a + 1j * rng.uniform(-10, 10, n) if complex_ else a


# ---------------------------------------------------------------- dense vs scipy

@pytest.mark.parametrize("method", list(SCIPY_NAME))
def test_dense_matches_scipy(method):
    rng = np.random.default_rng(1)
    for n in range(1, 7):
        for m in range(1, 4):
            A, B = stable_system(rng, n, m)
            for dt in STEPS:
                Abar, Bbar = discretize(A, B, dt, method)
                Ad, Bd = scipy_reference(A, B, dt, method)
                np.testing.assert_allclose(Abar, Ad, rtol=0, atol=1e-10)
                np.testing.assert_allclose(Bbar, Bd, rtol=0, atol=1e-10)


@pytest.mark.parametrize("scipy_name,ours", [("forward_diff", "euler"),
                                             ("backward_diff", "backward_euler")])
def test_scipy_method_names_are_accepted(scipy_name, ours):
    A, B = stable_system(np.random.default_rng(2), 3, 2)
    for got, want in zip(discretize(A, B, 0.1, scipy_name), discretize(A, B, 0.1, ours)):
        np.testing.assert_array_equal(got, want)


def test_dense_batched_steps_and_torch_agree():
    rng = np.random.default_rng(3)
    A, B = stable_system(rng, 4, 2, complex_=True)
    steps = np.logspace(-3, 0, 4)
    for method in disc.METHODS:
        Ab_np, Bb_np = discretizer("dense", method, "numpy")(A, B, steps)
        Ab_t, Bb_t = discretizer("dense", method, "torch")(torch.tensor(A), torch.tensor(B),
                                                           torch.tensor(steps))
        assert Ab_np.shape == (4, 4, 4) and Bb_np.shape == (4, 4, 2)
        for h, dt in enumerate(steps):
            Ad, Bd = discretize(A, B, dt, method)
            np.testing.assert_allclose(Ab_np[h], Ad, atol=1e-12)
            np.testing.assert_allclose(Bb_np[h], Bd, atol=1e-12)
        np.testing.assert_allclose(Ab_t.numpy(), Ab_np, atol=1e-12)
        np.testing.assert_allclose(Bb_t.numpy(), Bb_np, atol=1e-12)


def test_zoh_complex_dense_matches_block_expm():
    A, B = stable_system(np.random.default_rng(4), 3, 2, complex_=True)
    block = np.zeros((5, 5), complex)
    block[:3, :3], block[:3, 3:] = A, B
    ref = scipy.linalg.expm(0.3 * block)
    Abar, Bbar = discretize(A, B, 0.3, "zoh")
    np.testing.assert_allclose(Abar, ref[:3, :3], atol=1e-12)
    np.testing.assert_allclose(Bbar, ref[:3, 3:], atol=1e-12)


def test_expm_matches_scipy_across_norms():
    rng = np.random.default_rng(5)
    stack = rng.standard_normal((6, 5, 5)) * np.array([1e-6, 1e-2, 1, 5, 30, 100])[:, None, None]
    got = expm(stack)
    for M, E in zip(stack, got):
        ref = scipy.linalg.expm(M)
        np.testing.assert_allclose(E, ref, rtol=1e-11, atol=1e-13 * np.abs(ref).max())


# ---------------------------------------------------------------- diagonal

@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("method", disc.METHODS)
def test_diag_matches_dense(method, complex_):
    rng = np.random.default_rng(6)
    a = random_diag(rng, 5, complex_)
    B = rng.standard_normal((5, 3))
    for dt in STEPS:
        abar, bbar = discretize(a, B, dt, method)
        Ad, Bd = discretize(np.diag(a), B, dt, method)
        np.testing.assert_allclose(np.diag(abar), Ad, atol=1e-12)
        np.testing.assert_allclose(bbar, Bd, atol=1e-12)
        abar1, bbar1 = discretize(a, B[:, 0], dt, method)  # B as (N,)
        np.testing.assert_allclose(abar1, abar, atol=0)
        np.testing.assert_allclose(bbar1, bbar[:, 0], atol=0)


def test_mamba_is_zoh_for_A_and_euler_for_B():
    a = random_diag(np.random.default_rng(7), 4, True)
    b = np.arange(1.0, 5.0)
    abar, bbar = discretize(a, b, 0.05, "mamba")
    np.testing.assert_allclose(abar, np.exp(0.05 * a), rtol=1e-15)
    np.testing.assert_allclose(bbar, 0.05 * b, rtol=1e-15)


def zoh_b_mpmath(a, dt, b):
    with mpmath.workdps(50):
        a, dt = mpmath.mpmathify(a), mpmath.mpf(dt)
        value = dt if a == 0 else mpmath.expm1(a * dt) / a
        return complex(value * b)


@pytest.mark.parametrize("a", [-1e-12, 1e-12, -1e-300, -3e-5, -1e-4, -2e-4, 7e-4, -0.5,
                               1e-13j, -1e-9 + 2e-6j, -2e-4 + 1e-5j])
def test_zoh_input_matrix_is_accurate_near_zero(a):
    dt, b = 0.7, 1.3
    _, bbar = discretize(np.array([a]), np.array([b]), dt, "zoh")
    ref = zoh_b_mpmath(a, dt, b)
    assert abs(bbar[0] - ref) <= 2e-16 * abs(ref)
    assert abs(bbar[0] - dt * b) <= abs(a) * dt * dt * b  # the limit dt*B as A -> 0


def test_zoh_exact_zero_is_dt_b_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        abar, bbar = discretize(np.array([0.0, -1.0, 0j]), np.array([2.0, 2.0, 2.0]), 0.25)
    assert abar[0] == 1 and bbar[0] == 0.5 and bbar[2] == 0.5


# ---------------------------------------------------------------- torch lowering

@pytest.mark.parametrize("method", disc.METHODS)
def test_torch_and_numpy_diag_callables_agree(method):
    rng = np.random.default_rng(8)
    a = np.concatenate([random_diag(rng, 6, True), [0, 1e-9, -2e-5 + 1e-6j]])  # Taylor branch too
    B = rng.standard_normal((4, 9)) + 1j * rng.standard_normal((4, 9))
    dt = np.logspace(-4, 0, 4)[:, None]
    want = discretizer("diag", method, "numpy")(a, B, dt)
    got = discretizer("diag", method, "torch")(torch.tensor(a), torch.tensor(B), torch.tensor(dt))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), np.broadcast_to(w, g.shape), rtol=1e-13, atol=1e-15)


def test_torch_float32_stays_float32():
    a = torch.tensor([-0.5, -1e-6, 0.0])
    abar, bbar = discretizer("diag", "zoh", "torch")(a, torch.ones(3), torch.tensor(0.1))
    assert abar.dtype == bbar.dtype == torch.float32
    ref = discretize(a.double().numpy(), np.ones(3), 0.1)
    np.testing.assert_allclose(abar.numpy(), ref[0], rtol=1e-6)
    np.testing.assert_allclose(bbar.numpy(), ref[1], rtol=1e-6)
    Abar, Bbar = discretizer("dense", "zoh", "torch")(torch.diag(a), torch.ones(3, 1), 0.1)
    assert Abar.dtype == Bbar.dtype == torch.float32
    np.testing.assert_allclose(Bbar[:, 0].numpy(), ref[1], rtol=1e-5)


@pytest.mark.parametrize("method", disc.METHODS)
@pytest.mark.parametrize("complex_", [False, True])
def test_torch_diag_gradients(method, complex_):
    dtype = torch.complex128 if complex_ else torch.float64
    a = torch.tensor([-0.8, -1e-6, 3e-5, -2.0], dtype=torch.float64)
    if complex_:
        a = a + 1j * torch.tensor([1.0, 0.0, 2e-6, -3.0], dtype=torch.float64)
    a = a.to(dtype).requires_grad_()
    b = torch.tensor([0.3, -1.2, 0.7, 2.0], dtype=dtype, requires_grad=True)
    dt = torch.tensor([0.5, 0.01, 0.9, 0.2], dtype=torch.float64, requires_grad=True)
    fn = discretizer("diag", method, "torch")
    assert torch.autograd.gradcheck(fn, (a, b, dt))


# ---------------------------------------------------------------- derivation

def test_safe_forms_equal_the_derived_forms():
    for method in disc.METHODS:
        raw = disc.raw_derivation(method)
        safe = disc.derivation("diag", method)
        for r, s in zip(raw, safe):
            r = sp.piecewise_fold(r)
            r = r.args[0][0] if isinstance(r, sp.Piecewise) else r
            assert sp.simplify(s.rewrite(sp.exp) - r) == 0


def test_gbt_derivations_are_the_textbook_forms():
    A, B, dt = disc.A, disc.B, disc.dt
    expected = {"bilinear": ((1 + dt * A / 2) / (1 - dt * A / 2), dt * B / (1 - dt * A / 2)),
                "euler": (1 + dt * A, dt * B),
                "backward_euler": (1 / (1 - dt * A), dt * B / (1 - dt * A))}
    for method, forms in expected.items():
        for got, want in zip(disc.derivation("diag", method), forms):
            assert sp.simplify(got - want) == 0


def test_describe_and_source():
    assert disc.describe("diag", "mamba") == "Abar = exp(A*dt); Bbar = B*dt"
    assert "phi1" in disc.describe("dense", "zoh")
    src = disc.source("diag", "zoh", "numpy")
    assert "numpy.expm1" in src and "def discretize_diag_zoh(A, B, dt)" in src
    assert "torch.expm1" in disc.source("diag", "zoh", "torch")
    assert "solve(" in disc.source("dense", "bilinear", "torch")
    assert discretizer("diag", "zoh", "numpy") is discretizer("diag", "zoh", "numpy")


def test_override_changes_generated_code():
    A, B, dt = disc.A, disc.B, disc.dt
    a, b = np.array([-1.0, -2.0]), np.array([1.0, 3.0])
    before = discretize(a, b, 0.1, "euler")
    with disc.override("diag", "euler", 1 + 2 * dt * A, 3 * dt * B):
        assert "3.0*B_re*dt" in disc.source("diag", "euler", "numpy")
        abar, bbar = discretize(a, b, 0.1, "euler")
        np.testing.assert_allclose(abar, 1 + 0.2 * a, rtol=1e-15)
        np.testing.assert_allclose(bbar, 0.3 * b, rtol=1e-15)
        t_abar, _ = discretizer("diag", "euler", "torch")(torch.tensor(a), torch.tensor(b), 0.1)
        np.testing.assert_allclose(t_abar.numpy(), 1 + 0.2 * a, rtol=1e-15)
    with disc.override("dense", "euler", 1 + 2 * dt * A, 3 * dt * B):
        Abar, Bbar = discretize(np.diag(a), b[:, None], 0.1, "euler")
        np.testing.assert_allclose(Abar, np.eye(2) + 0.2 * np.diag(a), rtol=1e-15)
        np.testing.assert_allclose(Bbar[:, 0], 0.3 * b, rtol=1e-15)
    for got, want in zip(discretize(a, b, 0.1, "euler"), before):
        np.testing.assert_array_equal(got, want)


def test_unlowerable_dense_override_is_reported():
    with disc.override("dense", "euler", disc.B * disc.A, disc.dt * disc.B):
        with pytest.raises(SeqcError, match="matrix function"):
            discretize(-np.eye(2), np.ones(2), 0.1, "euler")


# ---------------------------------------------------------------- user errors

@pytest.mark.parametrize("A,B,dt,method,message", [
    (-np.eye(2), np.ones(2), 0.1, "bilinaer", "did you mean 'bilinear'"),
    (-np.eye(2), np.ones(2), 0.1, "rk4", "unknown discretization method"),
    (-np.eye(2), np.ones(2), 0.0, "zoh", "positive"),
    (-np.eye(2), np.ones(2), -0.1, "zoh", "positive"),
    (-np.eye(2), np.ones(2), float("nan"), "zoh", "positive"),
    (-np.eye(2), np.ones(2), [0.1, 0.2], "zoh", "scalar"),
    (-np.ones((2, 3)), np.ones(2), 0.1, "zoh", "square"),
    (-np.ones((2, 2, 2)), np.ones(2), 0.1, "zoh", "square"),
    (-np.eye(2), np.ones(3), 0.1, "zoh", "B must have shape"),
    (-np.ones(2), np.ones((2, 2, 1)), 0.1, "zoh", "B must have shape"),
    (np.array([np.inf, 1.0]), np.ones(2), 0.1, "zoh", "finite"),
    (np.array(["a", "b"]), np.ones(2), 0.1, "zoh", "numeric"),
])
def test_bad_inputs_raise_seqc_error(A, B, dt, method, message):
    with pytest.raises(SeqcError, match=message):
        discretize(A, B, dt, method)


def test_bad_discretizer_arguments():
    with pytest.raises(SeqcError, match="did you mean 'diag'"):
        discretizer("diagg", "zoh", "numpy")
    with pytest.raises(SeqcError, match="did you mean 'torch'"):
        discretizer("diag", "zoh", "torhc")
