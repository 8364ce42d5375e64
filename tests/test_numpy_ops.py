"""The NumPy reference ops against independent references: closed-form sums and
kernels written here, SciPy, and torch (float64) with copied weights; plus
step-versus-forward and state hand-over for every stateful op."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqc.backends.numpy.ops as ops
from seqc import SeqcError
from seqc.init import init_layer
from seqc.registry import OPS, REQUIRED

TOL = 1e-10
DISCS = ("zoh", "bilinear", "euler", "backward_euler")


def full_attrs(op, **attrs):
    return {**{a.name: a.default for a in OPS[op].attrs if a.default is not REQUIRED}, **attrs}


def weights(op, in_shape, seed=0, **attrs):
    """Registry-shaped weights: the initialiser's, perturbed so no entry is special."""
    a = full_attrs(op, **attrs)
    shapes = {k: tuple(int(d) for d in s) for k, s in OPS[op].weights((in_shape,), a).items()}
    rng = np.random.default_rng(seed)
    return {k: w + 0.1 * rng.standard_normal(w.shape) for k, w in init_layer(op, shapes, a, rng).items()}


def t64(x):
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


def close(a, b, tol=TOL):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def cplx(pairs):
    return pairs[..., 0] + 1j * pairs[..., 1]


# -- stateless ops --------------------------------------------------------------------------

@pytest.mark.parametrize("name, ref", [
    ("silu", F.silu), ("gelu", F.gelu), ("relu", F.relu), ("softplus", F.softplus),
    ("sigmoid", torch.sigmoid), ("tanh", torch.tanh)])
def test_activations_match_torch(name, ref):
    x = np.concatenate([np.linspace(-40, 40, 301), np.random.default_rng(0).standard_normal(50)])
    close(getattr(ops, name)(x, p={}), ref(t64(x)).numpy())
    close(ops.ACTIVATIONS[name](x), ref(t64(x)).numpy())


def test_linear_norms_embedding_match_torch():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 6))
    W, b, g = rng.standard_normal((4, 6)), rng.standard_normal(4), rng.standard_normal(6)
    close(ops.linear(x, p={"weight": W, "bias": b}, out=4, bias=True), F.linear(t64(x), t64(W), t64(b)).numpy())
    close(ops.linear(x, p={"weight": W}, out=4, bias=False), x @ W.T)
    close(ops.layernorm(x, p={"weight": g, "bias": b[:1].repeat(6)}, eps=1e-5, bias=True),
          F.layer_norm(t64(x), (6,), t64(g), t64(b[:1].repeat(6)), 1e-5).numpy())
    close(ops.rmsnorm(x, p={"weight": g}, eps=1e-6), F.rms_norm(t64(x), (6,), t64(g), 1e-6).numpy())
    table, tokens = rng.standard_normal((10, 3)), rng.integers(0, 10, (2, 7))
    close(ops.embedding(tokens, p={"weight": table}), F.embedding(torch.from_numpy(tokens), t64(table)).numpy())
    with pytest.raises(SeqcError, match="token ids"):
        ops.embedding(np.array([[10]]), p={"weight": table})
    with pytest.raises(SeqcError, match="integer"):
        ops.embedding(np.zeros((1, 2)), p={"weight": table})


def test_structural_and_gating():
    rng = np.random.default_rng(2)
    x, g = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 3, 8))
    a, b = ops.split(x, p={}, sizes=2)
    close(a, x[..., :4])
    close(b, x[..., 4:])
    parts = ops.split(x, p={}, sizes=[1, 3, 4])
    assert [q.shape[-1] for q in parts] == [1, 3, 4]
    close(ops.concat(*parts, p={}), x)
    close(ops.glu(x, p={}, act="sigmoid"), F.glu(t64(x), dim=-1).numpy())
    close(ops.glu(x, p={}, act="gelu"), x[..., :4] * F.gelu(t64(x[..., 4:])).numpy())
    close(ops.gate(x, g, p={}, act="silu"), x * g / (1 + np.exp(-g)))
    close(ops.add(x, g, p={}), x + g)
    close(ops.sub(x, g, p={}), x - g)
    close(ops.mul(x, g, p={}), x * g)
    close(ops.dropout(x, p=0.5), x)
    for bad in (3, [4, 5]):
        with pytest.raises(SeqcError, match="split"):
            ops.split(x, p={}, sizes=bad)
    with pytest.raises(SeqcError, match="even"):
        ops.glu(x[..., :3], p={})


# -- conv1d ----------------------------------------------------------------------------------

@pytest.mark.parametrize("K, act", [(1, "identity"), (4, "silu"), (7, "gelu")])
def test_conv1d_matches_torch(K, act):
    rng = np.random.default_rng(K)
    x, w, b = rng.standard_normal((2, 9, 5)), rng.standard_normal((5, 1, K)), rng.standard_normal(5)
    y, _ = ops.conv1d(x, p={"weight": w, "bias": b}, kernel=K, activation=act, bias=True)
    ref = F.conv1d(t64(x).transpose(1, 2), t64(w), t64(b), padding=K - 1, groups=5)[..., :9].transpose(1, 2)
    close(y, {"identity": lambda t: t, "silu": F.silu, "gelu": F.gelu}[act](ref).numpy())


# -- ssm -------------------------------------------------------------------------------------

# dA, dB as functions of z = dt*A and dt, written from each method's definition.
HAND_DISC = {
    "zoh": lambda z, dt: (np.exp(z), dt * (np.exp(z) - 1) / z),
    "bilinear": lambda z, dt: ((1 + z / 2) / (1 - z / 2), dt / (1 - z / 2)),
    "euler": lambda z, dt: (1 + z, dt + 0 * z),
    "backward_euler": lambda z, dt: (1 / (1 - z), dt / (1 - z)),
}
SCIPY_METHOD = {"zoh": "zoh", "bilinear": "bilinear", "euler": "euler", "backward_euler": "backward_diff"}


def causal_conv(u, K):
    """u (B, L, H), K (H, L): y[b, t, h] = sum_{l<=t} K[h, l] u[b, t-l, h], via np.convolve."""
    L = u.shape[1]
    return np.stack([np.stack([np.convolve(u[b, :, h], K[h])[:L] for h in range(u.shape[2])], -1)
                     for b in range(u.shape[0])])


def s4d_reference(u, p, disc):
    """Vandermonde kernel K[l] = 2 Re(sum_n C_n dB_n dA_n^l), y = causal_conv(u, K) + D u."""
    A = -np.exp(p["log_A_real"]) + 1j * p["A_imag"]
    dt = np.exp(p["log_dt"])[:, None]
    dA, dB = HAND_DISC[disc](dt * A, dt)
    powers = dA[:, :, None] ** np.arange(u.shape[1])
    K = 2 * np.real(np.einsum("hn,hnl->hl", cplx(p["C"]) * dB, powers))
    return causal_conv(u, K) + p["D"] * u


def dense_reference(u, p, disc):
    """Per channel: scipy's discretisation, then dlsim.  Our y_t reads the state after
    u_t enters, so the simulated system's output is C Abar x_{t-1} + (C Bbar + D) u_t."""
    y = np.empty(u.shape)
    for h in range(u.shape[2]):
        Ad, Bd, *_ = scipy.signal.cont2discrete((p["A"], p["B"][h][:, None], p["C"][h][None], p["D"][h:h + 1]),
                                                np.exp(p["log_dt"][h]), method=SCIPY_METHOD[disc])
        c = p["C"][h][None]
        system = (Ad, Bd, c @ Ad, c @ Bd + p["D"][h], 1.0)
        for b in range(u.shape[0]):
            y[b, :, h] = scipy.signal.dlsim(system, u[b, :, h])[1][:, 0]
    return y


def s5_reference(u, p, disc):
    """y_t = sum_{l<=t} 2 Re(C diag(Lbar^l) Bbar) u_{t-l} + D u_t, discretised by hand."""
    lam = p["Lambda_re"] + 1j * p["Lambda_im"]
    step = np.exp(p["log_step"])
    Lbar, g = HAND_DISC[disc](step * lam, step)
    Bbar, C = g[:, None] * cplx(p["B"]), cplx(p["C"])
    L = u.shape[1]
    kernels = [2 * np.real(C @ (Lbar[:, None] ** l * Bbar)) for l in range(L)]   # each (H, H)
    y = np.stack([sum(u[:, t - l] @ kernels[l].T for l in range(t + 1)) for t in range(L)], axis=1)
    return y + p["D"] * u


def shift_reference(u, p, disc):
    """y_t = sum_n C[h, n] u_{t-n} + D u_t: a causal convolution with kernel C."""
    return causal_conv(u, p["C"]) + p["D"] * u


SSM_REFERENCE = {"diag": s4d_reference, "dense": dense_reference, "s5": s5_reference, "shift": shift_reference}


def ssm_case(kind, B, L, H, N, disc="zoh", seed=0):
    attrs = dict(kind=kind, d_state=N, disc=disc, init="hippo-legs" if kind == "dense" else "s4d-lin")
    u = np.random.default_rng(seed + 100).standard_normal((B, L, H))
    return u, weights("ssm", (B, L, H), seed, **attrs), attrs


@pytest.mark.parametrize("disc", DISCS)
def test_s4d_matches_vandermonde_kernel(disc):
    u, p, attrs = ssm_case("diag", 2, 300, 3, 8, disc)
    close(ops.ssm(u, p=p, **attrs)[0], s4d_reference(u, p, disc))


def test_s4d_long_sequence():
    u, p, attrs = ssm_case("diag", 1, 2000, 2, 16)
    close(ops.ssm(u, p=p, **attrs)[0], s4d_reference(u, p, "zoh"), 1e-9)


@pytest.mark.parametrize("kind", ["dense", "s5", "shift"])
@pytest.mark.parametrize("disc", DISCS)
def test_other_ssm_kinds_match_reference(kind, disc):
    if kind == "shift" and disc != "zoh":
        pytest.skip("the shift SSM has no discretisation")
    u, p, attrs = ssm_case(kind, 2, 40, 3, 6, disc)
    close(ops.ssm(u, p=p, **attrs)[0], SSM_REFERENCE[kind](u, p, disc))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["diag", "dense", "s5", "shift"]), B=st.integers(1, 2), L=st.integers(1, 13),
       H=st.integers(1, 3), half=st.integers(1, 4), odd=st.booleans(), seed=st.integers(0, 2**16),
       disc=st.sampled_from(DISCS))
def test_ssm_shapes_property(kind, B, L, H, half, odd, seed, disc):
    if kind == "shift":
        disc = "zoh"                      # the shift SSM has no discretisation
    N = 2 * half + (odd and kind in ("dense", "shift"))
    u, p, attrs = ssm_case(kind, B, L, H, N, disc=disc, seed=seed)
    y, state = ops.ssm(u, p=p, **attrs)
    assert y.shape == (B, L, H)
    assert {k: v.shape for k, v in state.items()} == \
        {k: (B,) + tuple(s) for k, s in OPS["ssm"].state(((B, L, H),), full_attrs("ssm", **attrs)).items()}
    close(y, SSM_REFERENCE[kind](u, p, disc))


# -- selective_ssm ----------------------------------------------------------------------------

def selective_reference(u, delta, Bm, Cm, z, p, disc, delta_bias):
    """y_t = sum_{s<=t} C_t . (prod_{r=s+1..t} dA_r) dB_s u_s + D u_t, times silu(z)."""
    if delta_bias:
        delta = delta + p["delta_bias"]
    delta = np.log1p(np.exp(delta))
    A = -np.exp(p["A_log"])                                           # (D, N)
    dtA, dt = delta[..., None] * A, delta[..., None] + 0 * A          # (B, L, D, N)
    if disc == "mamba":                                               # ZOH for A, Euler for B
        dA, dBfac = np.exp(dtA), dt
    else:                                                             # the hand-written formulas above
        dA, dBfac = HAND_DISC[disc](dtA, dt)
    dBu = dBfac * Bm[:, :, None, :] * u[..., None]
    Bsz, L, D = u.shape
    y = np.zeros(u.shape)
    for t in range(L):
        for s in range(t + 1):
            decay = np.prod(dA[:, s + 1:t + 1], axis=1)               # empty product = 1
            y[:, t] += np.einsum("bdn,bn->bd", decay * dBu[:, s], Cm[:, t])
    y += p["D"] * u
    return y if z is None else y * z / (1 + np.exp(-z))


def selective_case(B, L, D, N, *, gate=True, delta_bias=False, disc="mamba", seed=0):
    rng = np.random.default_rng(seed)
    attrs = dict(d_state=N, delta_bias=delta_bias, disc=disc)
    inputs = [rng.standard_normal((B, L, D)), rng.standard_normal((B, L, D)) - 1,
              rng.standard_normal((B, L, N)), rng.standard_normal((B, L, N))]
    if gate:
        inputs.append(rng.standard_normal((B, L, D)))
    return inputs, weights("selective_ssm", (B, L, D), seed, **attrs), attrs


@pytest.mark.parametrize("disc, gate, delta_bias", [("mamba", True, False), ("mamba", False, True),
                                                     ("zoh", True, True)])
def test_selective_scan_matches_unrolled_sum(disc, gate, delta_bias):
    inputs, p, attrs = selective_case(2, 9, 3, 4, gate=gate, delta_bias=delta_bias, disc=disc)
    z = inputs[4] if gate else None
    close(ops.selective_ssm(*inputs, p=p, **attrs)[0], selective_reference(*inputs[:4], z, p, disc, delta_bias))


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 2), L=st.integers(1, 8), D=st.integers(1, 3), N=st.integers(1, 5), seed=st.integers(0, 999),
       disc=st.sampled_from(["mamba", "zoh", "bilinear"]), gate=st.booleans(), delta_bias=st.booleans())
def test_selective_scan_property(B, L, D, N, seed, disc, gate, delta_bias):
    """Shapes, every discretization, with and without gate and delta bias, against the unrolled sum."""
    inputs, p, attrs = selective_case(B, L, D, N, gate=gate, delta_bias=delta_bias, disc=disc, seed=seed)
    y, state = ops.selective_ssm(*inputs, p=p, **attrs)
    assert y.shape == (B, L, D) and state["x"].shape == (B, D, N)
    close(y, selective_reference(*inputs[:4], inputs[4] if gate else None, p, disc, delta_bias))


# -- lstm and attention --------------------------------------------------------------------------

def test_lstm_matches_torch_two_layers():
    rng = np.random.default_rng(3)
    d, hidden, layers, B, L = 4, 5, 2, 3, 11
    p = weights("lstm", (B, L, d), hidden=hidden, layers=layers)
    h0, c0 = rng.standard_normal((B, layers, hidden)), rng.standard_normal((B, layers, hidden))
    x = rng.standard_normal((B, L, d))
    y, state = ops.lstm(x, p=p, state={"h": h0, "c": c0}, hidden=hidden, layers=layers)
    net = torch.nn.LSTM(d, hidden, num_layers=layers, batch_first=True).double()
    net.load_state_dict({k: t64(v) for k, v in p.items()})
    with torch.no_grad():
        ref, (hn, cn) = net(t64(x), (t64(h0).transpose(0, 1), t64(c0).transpose(0, 1)))
    close(y, ref.numpy())
    close(state["h"], hn.transpose(0, 1).numpy())
    close(state["c"], cn.transpose(0, 1).numpy())


def explicit_attention(x, p, heads, bias):
    """Per batch and head: softmax over the visible keys, written out with loops."""
    B, L, d = x.shape
    hd = d // heads
    proj = {n: x @ p[f"{n}.weight"].T + (p[f"{n}.bias"] if bias else 0) for n in ("q_proj", "k_proj", "v_proj")}
    out = np.zeros((B, L, d))
    for b in range(B):
        for h in range(heads):
            cols = slice(h * hd, (h + 1) * hd)
            q, k, v = (proj[n][b, :, cols] for n in ("q_proj", "k_proj", "v_proj"))
            for t in range(L):
                s = np.array([q[t] @ k[j] / np.sqrt(hd) for j in range(t + 1)])
                w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                out[b, t, cols] = w @ v[:t + 1]
    return out @ p["o_proj.weight"].T + (p["o_proj.bias"] if bias else 0)


@pytest.mark.parametrize("heads, bias", [(1, False), (2, True), (3, False)])
def test_attention_matches_explicit_softmax_and_sdpa(heads, bias):
    B, L, d = 2, 7, 6
    x = np.random.default_rng(heads).standard_normal((B, L, d))
    p = weights("attention", (B, L, d), heads=heads, bias=bias)
    y, state = ops.attention(x, p=p, heads=heads, bias=bias)
    close(y, explicit_attention(x, p, heads, bias))
    lin = {n: F.linear(t64(x), t64(p[f"{n}.weight"]), t64(p[f"{n}.bias"]) if bias else None)
           .reshape(B, L, heads, d // heads).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj")}
    o = F.scaled_dot_product_attention(lin["q_proj"], lin["k_proj"], lin["v_proj"], is_causal=True)
    o = F.linear(o.transpose(1, 2).reshape(B, L, d), t64(p["o_proj.weight"]), t64(p["o_proj.bias"]) if bias else None)
    close(y, o.numpy())
    assert state["k"].shape == (B, heads, L, d // heads)


# -- recurrence: step == forward, state hand-over ----------------------------------------------------

def _rng_inputs(shapes, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes]


def _streaming_cases():
    B, L = 2, 9
    cases = [("conv1d", [(B, L, 3)], dict(kernel=4, activation="silu")),
             ("conv1d", [(B, L, 3)], dict(kernel=1, bias=False)),
             ("lstm", [(B, L, 3)], dict(hidden=4, layers=2)),
             ("attention", [(B, L, 4)], dict(heads=2, bias=True)),
             ("attention", [(B, L, 6)], dict(heads=4, kv_heads=2, head_dim=2, rope=True)),
             ("attention", [(B, L, 4)], dict(heads=2, kv_heads=1, rope=True, rope_theta=50.0, window=3))]
    for kind, discs in (("diag", DISCS), ("dense", DISCS), ("s5", DISCS), ("shift", ("zoh",))):
        for disc in discs:
            cases.append(("ssm", [(B, L, 3)], dict(kind=kind, d_state=4 if kind != "shift" else 5, disc=disc,
                                                    init="hippo-legs" if kind == "dense" else "s4d-lin")))
    for disc in ("mamba", "zoh", "bilinear"):
        cases.append(("selective_ssm", [(B, L, 3), (B, L, 3), (B, L, 2), (B, L, 2), (B, L, 3)],
                      dict(d_state=2, disc=disc, delta_bias=True)))
    cases.append(("selective_ssm", [(B, L, 3), (B, L, 3), (B, L, 2), (B, L, 2)], dict(d_state=2)))
    return cases


@pytest.mark.parametrize("op, shapes, attrs", _streaming_cases(),
                         ids=[f"{c[0]}-{'-'.join(map(str, c[2].values()))}-{len(c[1])}in" for c in _streaming_cases()])
def test_step_and_state_handover(op, shapes, attrs):
    seq, step, init = getattr(ops, op), getattr(ops, op + "_step"), getattr(ops, op + "_init_state")
    inputs = _rng_inputs(shapes, 7)
    p = weights(op, shapes[0], **attrs)
    y, final = seq(*inputs, p=p, **attrs)

    # split the sequence in two and hand the state over
    y1, mid = seq(*(a[:, :4] for a in inputs), p=p, **attrs)
    mid_copy = copy.deepcopy(mid)
    y2, end = seq(*(a[:, 4:] for a in inputs), p=p, state=mid, **attrs)
    close(np.concatenate([y1, y2], axis=1), y)
    for k in final:
        close(end[k], final[k])
        close(mid[k], mid_copy[k])          # the given state is not mutated

    # one step at a time from the zero state
    state = init(shapes[0][0], p, **attrs)
    outs = []
    for t in range(shapes[0][1]):
        y_t, state = step(*(a[:, t] for a in inputs), p=p, state=state, **attrs)
        outs.append(y_t)
    close(np.stack(outs, axis=1), y)
    for k in final:
        close(state[k], final[k])


def test_init_states_are_zero_and_registry_shaped():
    p = weights("ssm", (1, 1, 3), kind="diag", d_state=4)
    assert ops.ssm_init_state(2, p, kind="diag", d_state=4)["x"].shape == (2, 3, 2, 2)
    p = weights("lstm", (1, 1, 3), hidden=4, layers=2)
    s = ops.lstm_init_state(2, p, hidden=4, layers=2)
    assert s["h"].shape == s["c"].shape == (2, 2, 4) and not s["h"].any()
    p = weights("attention", (1, 1, 4), heads=2)
    assert ops.attention_init_state(3, p, heads=2)["k"].shape == (3, 2, 0, 2)
