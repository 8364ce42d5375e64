"""Initialisers: closed forms from the papers, HiPPO-LegS properties, determinism,
per-layer independence and the weight keys / shapes of whole graphs."""
from __future__ import annotations

import math

import numpy as np
import pytest

import seqc
from seqc import SeqcError
from seqc.init import (hippo_legs, hippo_legs_normal, init_layer, init_weights, mamba_A_log, mamba_dt_bias,
                       s4d_inv, s4d_lin, s4d_real)
from seqc.registry import OPS, REQUIRED

MIXED = """model M(d = 6) {
  input x: [B, L, d]
  s = ssm(x, d_state = 4, kind = s5) as ssm
  t = ssm(s, d_state = 5, kind = dense, init = "hippo-legs") as dense
  u = ssm(t, d_state = 8, init = "s4d-inv") as diag
  v = ssm(u, d_state = 3, kind = shift) as shift
  l = lstm(v, hidden = 5, layers = 2) as lstm
  a = attention(l, heads = 1, bias = true) as attn
  n = layernorm(a) as norm
  return n
}"""


def shapes_of(op, in_shape, **attrs):
    a = {**{x.name: x.default for x in OPS[op].attrs if x.default is not REQUIRED}, **attrs}
    return {k: tuple(int(d) for d in s) for k, s in OPS[op].weights((in_shape,), a).items()}, a


def layer(op, in_shape, seed=0, **attrs):
    shapes, a = shapes_of(op, in_shape, **attrs)
    return init_layer(op, shapes, a, np.random.default_rng(seed))


# -- S4D and HiPPO closed forms -----------------------------------------------------------------

def test_s4d_initialisations_follow_the_paper():
    H, N = 3, 8
    for n in range(N // 2):
        assert s4d_lin(H, N)[2, n] == pytest.approx(-0.5 + 1j * math.pi * n)
        assert s4d_inv(H, N)[1, n] == pytest.approx(-0.5 + 1j * N / math.pi * (N / (2 * n + 1) - 1))
        assert s4d_real(H, N)[0, n] == -(n + 1)
    assert s4d_lin(H, N).shape == (H, N // 2)
    with pytest.raises(SeqcError, match="even"):
        s4d_lin(H, 5)


def hippo_from_definition(N):
    A = np.zeros((N, N))
    for n in range(N):
        for k in range(N):
            if n > k:
                A[n, k] = -math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1)
            elif n == k:
                A[n, k] = -(n + 1)
    return A, np.array([math.sqrt(2 * n + 1) for n in range(N)])


@pytest.mark.parametrize("N", [1, 2, 5, 16])
def test_hippo_legs_definition(N):
    A, B = hippo_legs(N)
    A_ref, B_ref = hippo_from_definition(N)
    np.testing.assert_allclose(A, A_ref, rtol=1e-14)
    np.testing.assert_allclose(B, B_ref, rtol=1e-14)
    assert np.array_equal(A, np.tril(A))
    np.testing.assert_allclose(np.sort(np.linalg.eigvals(A).real), -np.arange(N, 0, -1.0))


@pytest.mark.parametrize("N", [2, 8, 32])
def test_hippo_legs_normal_part(N):
    A, _ = hippo_legs(N)
    P = np.sqrt(np.arange(N) + 0.5)
    S = A + np.outer(P, P)
    np.testing.assert_allclose(S + S.T, -np.eye(N), atol=1e-12)      # S = -1/2 I + skew-symmetric
    K = S + 0.5 * np.eye(N)
    np.testing.assert_allclose(K, -K.T, atol=1e-12)
    assert np.abs(np.linalg.eigvals(K).real).max() < 1e-8              # skew part: purely imaginary spectrum

    Lam, V = hippo_legs_normal(N)
    assert Lam.shape == (N // 2,) and V.shape == (N, N // 2)
    np.testing.assert_allclose(Lam.real, -0.5, atol=1e-12)
    assert (Lam.imag > 0).all()
    np.testing.assert_allclose(S @ V, V * Lam, atol=1e-9 * N)          # eigenpairs of S
    both = np.concatenate([Lam, Lam.conj()])                           # conjugate halves recover the spectrum
    full = np.linalg.eigvals(S)
    np.testing.assert_allclose(np.sort(both.imag), np.sort(full.imag), atol=1e-8 * N)
    np.testing.assert_allclose(V.conj().T @ V, np.eye(N // 2), atol=1e-10)


# -- Mamba ---------------------------------------------------------------------------------------

def test_mamba_dt_bias_is_inverse_softplus_of_log_uniform_dt():
    rng = np.random.default_rng(0)
    bias = mamba_dt_bias(20000, 1e-3, 1e-1, 1e-4, rng)
    dt = np.log1p(np.exp(bias))                                        # softplus
    assert dt.min() >= 1e-3 * (1 - 1e-9) and dt.max() <= 1e-1 * (1 + 1e-9)
    log_dt = np.log(dt)                                                # uniform on [log 1e-3, log 1e-1]
    assert abs(log_dt.mean() - math.log(1e-2)) < 0.05
    assert abs(log_dt.std() - (math.log(1e-1) - math.log(1e-3)) / math.sqrt(12)) < 0.05
    floored = np.log1p(np.exp(mamba_dt_bias(100, 1e-6, 1e-5, 1e-3, rng)))
    np.testing.assert_allclose(floored, 1e-3, rtol=1e-9)


def test_mamba_graph_weights():
    g = seqc.build_graph("examples/mamba.seq")
    w = init_weights(g, seed=0)
    assert {k: v.shape for k, v in w.items()} == g.weight_shapes()
    assert all(v.dtype == np.float64 for v in w.values())
    np.testing.assert_array_equal(w["layers.0.mixer.A_log"], np.log(np.tile(np.arange(1, 17), (128, 1))))
    np.testing.assert_array_equal(mamba_A_log(2, 3), np.log([[1, 2, 3], [1, 2, 3]]))
    np.testing.assert_array_equal(w["layers.1.mixer.D"], 1.0)
    np.testing.assert_array_equal(w["layers.0.norm.weight"], 1.0)
    dt_rank = g.weight_shapes()["layers.0.mixer.dt_proj.weight"][1]
    assert np.abs(w["layers.0.mixer.dt_proj.weight"]).max() <= dt_rank ** -0.5
    dt = np.log1p(np.exp(w["layers.0.mixer.dt_proj.bias"]))
    assert dt.min() >= 1e-3 * (1 - 1e-9) and dt.max() <= 0.1 * (1 + 1e-9)
    assert np.abs(w["layers.0.mixer.conv1d.weight"]).max() <= 0.5        # U(+-1/sqrt(K)), K = 4
    fan_in = 64
    in_proj = w["layers.0.mixer.in_proj.weight"]
    assert np.abs(in_proj).max() <= fan_in ** -0.5
    assert abs(in_proj.var() - 1 / (3 * fan_in)) < 0.1 / (3 * fan_in)  # variance of U(-b, b) is b^2/3


# -- determinism and independence -------------------------------------------------------------------

def test_deterministic_for_a_seed_and_different_across_seeds():
    g = seqc.build_graph(MIXED)
    a, b, c = init_weights(g, 0), init_weights(g, 0), init_weights(g, 1)
    assert {k: v.shape for k, v in a.items()} == g.weight_shapes()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    random_keys = [k for k in a if not np.array_equal(a[k], c[k])]
    assert {k.split(".")[0] for k in random_keys} == {"ssm", "dense", "diag", "shift", "lstm", "attn"}


def test_adding_a_layer_leaves_the_others_unchanged():
    one = init_weights(seqc.build_graph("examples/mamba.seq", params={"n_layers": 1}), seed=3)
    two = init_weights(seqc.build_graph("examples/mamba.seq", params={"n_layers": 2}), seed=3)
    assert set(one) < set(two)
    for k in one:
        np.testing.assert_array_equal(one[k], two[k])


# -- per-op rules -------------------------------------------------------------------------------------

def test_ssm_initialisers():
    diag = layer("ssm", (1, 1, 4), d_state=8, init="s4d-lin", dt_min=1e-3, dt_max=1e-1)
    np.testing.assert_allclose(diag["log_A_real"], math.log(0.5))
    np.testing.assert_allclose(diag["A_imag"], np.tile(math.pi * np.arange(4), (4, 1)))
    assert (diag["log_dt"] >= math.log(1e-3)).all() and (diag["log_dt"] <= math.log(1e-1)).all()
    real = layer("ssm", (1, 1, 2), d_state=6, init="s4d-real")
    np.testing.assert_allclose(-np.exp(real["log_A_real"]), [[-1, -2, -3]] * 2)
    np.testing.assert_array_equal(real["A_imag"], 0.0)

    dense = layer("ssm", (1, 1, 3), d_state=5, kind="dense", init="hippo-legs")
    np.testing.assert_array_equal(dense["A"], hippo_legs(5)[0])
    np.testing.assert_array_equal(dense["B"], np.tile(hippo_legs(5)[1], (3, 1)))
    dense_real = layer("ssm", (1, 1, 3), d_state=4, kind="dense", init="s4d-real")
    np.testing.assert_array_equal(dense_real["A"], -np.diag([1.0, 2, 3, 4]))

    s5 = layer("ssm", (1, 1, 3), d_state=8, kind="s5")
    lam, _ = hippo_legs_normal(8)
    np.testing.assert_allclose(s5["Lambda_re"] + 1j * s5["Lambda_im"], lam)
    assert s5["B"].shape == (4, 3, 2) and s5["C"].shape == (3, 4, 2)
    with pytest.raises(SeqcError, match="dense"):
        layer("ssm", (1, 1, 3), d_state=4, kind="dense", init="s4d-lin")


def test_pytorch_default_rules():
    lstm = layer("lstm", (1, 1, 3), hidden=16, layers=2)
    assert all(np.abs(v).max() <= 0.25 for v in lstm.values())
    attn = layer("attention", (1, 1, 9), heads=3, bias=True)
    assert all(np.abs(v).max() <= 1 / 3 for v in attn.values()) and attn["o_proj.bias"].any()
    zeros = layer("linear", (1, 1, 4), out=3, init="zeros")
    assert not zeros["weight"].any() and not zeros["bias"].any()
    ln = layer("layernorm", (1, 1, 4))
    np.testing.assert_array_equal(ln["weight"], 1.0)
    np.testing.assert_array_equal(ln["bias"], 0.0)
    emb = layer("embedding", (1, 1), vocab=5000, dim=8)["weight"]
    assert abs(emb.std() - 1) < 0.02 and abs(emb.mean()) < 0.02


@pytest.mark.parametrize("N", [4, 16, 64])
def test_s4d_legs_scales_each_mode_by_the_diagonalised_hippo_b(N):
    """S4D-LegS: mode n's input is scaled by |B~_n|, B~ = V^H B with V the eigenvectors of
    HiPPO-LegS's normal part.  The reference diagonalises S = A + P P^T with a general
    eigensolver from the definition (not the code's Hermitian route), matches modes by
    eigenvalue, and reads the folded scale as |C_legs| / |C_lin| for the same random draw."""
    A, B = hippo_from_definition(N)
    P = np.sqrt(np.arange(N) + 0.5)
    w, V = np.linalg.eig(A + np.outer(P, P))
    legs = layer("ssm", (1, 1, 3), seed=7, d_state=N, init="hippo-legs")
    lin = layer("ssm", (1, 1, 3), seed=7, d_state=N, init="s4d-lin")
    np.testing.assert_array_equal(legs["log_dt"], lin["log_dt"])          # the same draws, in the same order
    mag = lambda c: np.hypot(c[..., 0], c[..., 1])                        # noqa: E731
    ratio = mag(legs["C"]) / mag(lin["C"])                                # (H, N/2)
    for m, lam in enumerate(legs["A_imag"][0]):
        k = np.argmin(np.abs(w.imag - lam))
        assert abs(w[k].imag - lam) < 1e-8 * N and abs(w[k].real + 0.5) < 1e-8
        v = V[:, k] / np.linalg.norm(V[:, k])
        want = abs(np.vdot(v, B))
        np.testing.assert_allclose(ratio[:, m], want, rtol=1e-9)
    assert ratio.std(axis=0).max() < 1e-12 and np.ptp(ratio[0]) > 0.1 * ratio[0].max()   # per mode, not uniform
    # the phase of each C entry is untouched (only |B~_n| is folded)
    ang = lambda c: np.arctan2(c[..., 1], c[..., 0])                      # noqa: E731
    np.testing.assert_allclose(ang(legs["C"]), ang(lin["C"]), atol=1e-12)
