"""Reference semantics of every op in ``seqc.registry.OPS``, in plain float64 NumPy.

This module is the oracle the other backends are checked against, so it is
written to be obviously correct rather than fast: recurrences run one time
step at a time, attention builds its causal softmax explicitly, convolution
is a direct sum over taps.

Calling convention (the numpy code generator emits exactly these calls):

* stateless op ``name``: ``name(*inputs, p=weights, **attrs)`` -> one array
  (a tuple for ``split``).  ``weights`` holds the layer's weights under the
  registry's names (``{}`` or nothing for ops without weights); ``attrs`` are
  the node's attributes, unknown ones ignored, missing ones taking the
  registry's defaults.
* stateful op (``conv1d``, ``ssm``, ``selective_ssm``, ``lstm``,
  ``attention``): ``name(*inputs, p=, state=None, **attrs) -> (y, final_state)``
  on sequences ``(B, L, .)``; ``name_init_state(batch, p, **attrs)`` -> the zero
  state; ``name_step(*inputs_t, p=, state=, **attrs) -> (y_t, new_state)`` on
  inputs ``(B, .)``.  No function mutates the state it is given.

State layouts (dicts of float64 arrays, batch first; the registry's ``state``
rule gives the shapes, except attention's cache):

* ``conv1d``: ``window (B, D, K-1)``, the last K-1 inputs, oldest first.
* ``ssm`` diag: ``x (B, H, N/2, 2)``, the complex modes as (real, imag);
  dense: ``x (B, H, N)``; s5: ``x (B, N/2, 2)`` complex as (real, imag);
  shift: ``x (B, H, N)``, the last N inputs, newest first.
* ``selective_ssm``: ``x (B, D, N)``.
* ``lstm``: ``h``, ``c`` of shape ``(B, layers, hidden)`` (torch keeps
  ``(layers, B, hidden)``; transpose to hand a state over).
* ``attention``: ``k``, ``v`` of shape ``(B, heads, T, head_dim)``, the KV
  cache of the T positions seen so far (T = 0 initially).

Conjugate-pair convention (``ssm`` kinds diag and s5): each stored complex mode
stands for itself and its conjugate, so outputs read ``y = 2 Re(C x) + D u``.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from seqc.discretization import discretizer
from seqc.errors import SeqcError
from seqc.registry import OPS, split_sizes

# -- helpers --------------------------------------------------------------------


def _f64(x):
    return np.asarray(x, dtype=np.float64)


def _with_defaults(op_name: str):
    """Fill attributes the caller left out with the registry's defaults."""
    defaults = OPS[op_name].defaults

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            return fn(*args, **{**defaults, **kwargs})
        return call
    return wrap


def _step_of(sequence_fn):
    """The one-step form of a sequence op: run it on a length-1 sequence."""
    @functools.wraps(sequence_fn)
    def step(*inputs_t, p, state, **attrs):
        seq = [None if a is None else np.asarray(a)[:, None] for a in inputs_t]
        y, new_state = sequence_fn(*seq, p=p, state=state, **attrs)
        return y[:, 0], new_state
    step.__name__ = step.__qualname__ = sequence_fn.__name__ + "_step"
    step.__doc__ = f"One time step of ``{sequence_fn.__name__}``: inputs (B, .) -> (y_t, new_state)."
    return step


def _zero_state(op_name: str, batch: int, features: int, attrs: dict) -> dict:
    """Zeros in the registry's state layout for an input with `features` features."""
    shapes = OPS[op_name].state(((batch, 1, features),), attrs)
    return {k: np.zeros((batch,) + tuple(int(d) for d in s)) for k, s in shapes.items()}


def _sub(p: dict, prefix: str) -> dict:
    """The weights under `prefix.` with the prefix removed (attention's projections)."""
    return {k[len(prefix) + 1:]: v for k, v in p.items() if k.startswith(prefix + ".")}


def _to_complex(pairs):
    return pairs[..., 0] + 1j * pairs[..., 1]


def _to_pairs(z):
    return np.stack([z.real, z.imag], axis=-1)


# -- activations -------------------------------------------------------------------

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))


def _softplus(x):
    """torch.nn.functional.softplus (beta 1, threshold 20), as mamba_ssm uses it."""
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


ACTIVATIONS = {
    "identity": lambda x: x,
    "silu": lambda x: x * _sigmoid(x),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),   # exact (erf) GELU, torch's default
    "relu": lambda x: np.maximum(x, 0.0),
    "softplus": _softplus,
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
}


def _activation_op(name: str):
    fn = ACTIVATIONS[name]

    def act(x, *, p=None, **_):
        return fn(_f64(x))
    act.__name__ = act.__qualname__ = name
    act.__doc__ = f"elementwise {name}"
    return act


silu, gelu, relu, softplus, sigmoid, tanh = (
    _activation_op(n) for n in ("silu", "gelu", "relu", "softplus", "sigmoid", "tanh"))


def dropout(x, **_):
    """Identity: the reference backend runs at inference (the attribute `p` is the drop rate)."""
    return _f64(x)


# -- elementwise and structural ---------------------------------------------------------


def add(a, b, *, p=None, **_):
    return _f64(a) + _f64(b)


def sub(a, b, *, p=None, **_):
    return _f64(a) - _f64(b)


def mul(a, b, *, p=None, **_):
    return _f64(a) * _f64(b)


def split(x, *, sizes, p=None, **_):
    """Split the last dimension: `sizes` is a number of equal parts or a list of sizes."""
    x = _f64(x)
    return tuple(np.split(x, np.cumsum(split_sizes(x.shape[-1], sizes))[:-1], axis=-1))


def concat(*xs, p=None, **_):
    return np.concatenate([_f64(x) for x in xs], axis=-1)


@_with_defaults("gate")
def gate(x, g, *, act, p=None, **_):
    """x * act(g)."""
    return _f64(x) * ACTIVATIONS[act](_f64(g))


@_with_defaults("glu")
def glu(x, *, act, p=None, **_):
    """a * act(b) where a, b are the first and second halves of the last dimension."""
    x = _f64(x)
    if x.shape[-1] % 2:
        raise SeqcError(f"glu needs an even number of features, got {x.shape[-1]}")
    a, b = np.split(x, 2, axis=-1)
    return a * ACTIVATIONS[act](b)


@_with_defaults("linear")
def linear(x, *, p, bias, **_):
    """x W^T + b over the last dimension (torch.nn.Linear layout)."""
    y = _f64(x) @ p["weight"].T
    return y + p["bias"] if bias else y


@_with_defaults("layernorm")
def layernorm(x, *, p, eps, bias, **_):
    x = _f64(x)
    centred = x - x.mean(axis=-1, keepdims=True)
    y = centred / np.sqrt((centred ** 2).mean(axis=-1, keepdims=True) + eps) * p["weight"]
    return y + p["bias"] if bias else y


@_with_defaults("rmsnorm")
def rmsnorm(x, *, p, eps, **_):
    """x / sqrt(mean(x^2) + eps) * weight, as mamba_ssm's RMSNorm."""
    x = _f64(x)
    return x / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + eps) * p["weight"]


def embedding(tokens, *, p, **_):
    """Rows of the (vocab, dim) table for integer tokens."""
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise SeqcError(f"embedding needs integer tokens, got {tokens.dtype}")
    vocab = p["weight"].shape[0]
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        raise SeqcError(f"token ids must lie in [0, {vocab}), got range [{tokens.min()}, {tokens.max()}]")
    return _f64(p["weight"])[tokens]


# -- conv1d ----------------------------------------------------------------------------


@_with_defaults("conv1d")
def conv1d_init_state(batch, p, **attrs):
    return _zero_state("conv1d", batch, p["weight"].shape[0], {**attrs, "kernel": p["weight"].shape[-1]})


@_with_defaults("conv1d")
def conv1d(x, *, p, state=None, bias, activation, **_):
    """Causal depthwise convolution over time, torch Conv1d(groups=D, padding=K-1)
    keeping the first L outputs: y[t, d] = sum_k w[d, 0, k] x[t - (K-1) + k, d]."""
    x = _f64(x)
    batch, length, _d = x.shape
    w = p["weight"][:, 0, :]                                   # (D, K)
    window = (conv1d_init_state(batch, p) if state is None else state)["window"]
    padded = np.concatenate([window.transpose(0, 2, 1), x], axis=1)   # (B, K-1+L, D)
    y = np.zeros(x.shape)
    for k in range(w.shape[1]):
        y = y + padded[:, k:k + length, :] * w[:, k]
    if bias:
        y = y + p["bias"]
    return ACTIVATIONS[activation](y), {"window": padded[:, length:, :].transpose(0, 2, 1).copy()}


conv1d_step = _step_of(conv1d)


# -- ssm (linear time-invariant) ---------------------------------------------------------


def _lti_scan(u, x, advance, readout, D):
    """x_t = advance(x_{t-1}, u_t), y_t = readout(x_t) + D u_t, one step at a time."""
    y = np.empty(u.shape)
    for t in range(u.shape[1]):
        x = advance(x, u[:, t])
        y[:, t] = readout(x) + D * u[:, t]
    return y, x


def _ssm_diag(u, p, x0, disc):
    """S4D: H channels of N/2 complex modes, dA = disc(A), dB = disc(B = 1), C absorbs B."""
    A = -np.exp(p["log_A_real"]) + 1j * p["A_imag"]                       # (H, N/2)
    dA, dB = discretizer("diag", disc, "numpy")(A, np.ones_like(A), np.exp(p["log_dt"])[:, None])
    C = _to_complex(p["C"])
    y, x = _lti_scan(u, _to_complex(x0),
                     lambda x, u_t: dA * x + dB * u_t[:, :, None],
                     lambda x: 2.0 * (C * x).sum(axis=-1).real, p["D"])
    return y, _to_pairs(x)


def _ssm_dense(u, p, x0, disc):
    """One dense A (N, N) shared by all channels, per-channel B_h, C_h and step dt_h."""
    n = p["A"].shape[0]
    # Bbar_h = G_h B_h with G_h = disc(B = I): N x N blocks, not (N + H)-sized ones per channel
    Abar, gain = discretizer("dense", disc, "numpy")(p["A"], np.eye(n), np.exp(p["log_dt"]))
    Bbar = np.einsum("hnm,hm->hn", gain, p["B"])                         # (H, N)
    return _lti_scan(u, x0,
                     lambda x, u_t: np.einsum("hnm,bhm->bhn", Abar, x) + Bbar * u_t[:, :, None],
                     lambda x: (p["C"] * x).sum(axis=-1), p["D"])


def _ssm_s5(u, p, x0, disc):
    """MIMO S5: one state of N/2 complex modes, x_t = Lbar x + Bbar u_t, y = 2 Re(C x) + D u."""
    Lam = p["Lambda_re"] + 1j * p["Lambda_im"]                           # (P,)
    Lbar, gain = discretizer("diag", disc, "numpy")(Lam, np.ones_like(Lam), np.exp(p["log_step"]))
    Bbar = gain[:, None] * _to_complex(p["B"])                           # (P, H)
    C = _to_complex(p["C"])                                              # (H, P)
    y, x = _lti_scan(u, _to_complex(x0),
                     lambda x, u_t: Lbar * x + u_t @ Bbar.T,
                     lambda x: 2.0 * (x @ C.T).real, p["D"])
    return y, _to_pairs(x)


def _ssm_shift(u, p, x0, disc):
    """H3's shift SSM: x is the last N inputs (newest first), y = sum_n C[h, n] x[n] + D u."""
    return _lti_scan(u, x0,
                     lambda x, u_t: np.concatenate([u_t[:, :, None], x[:, :, :-1]], axis=-1),
                     lambda x: (p["C"] * x).sum(axis=-1), p["D"])


_SSM_KINDS = {"diag": _ssm_diag, "dense": _ssm_dense, "s5": _ssm_s5, "shift": _ssm_shift}


@_with_defaults("ssm")
def ssm_init_state(batch, p, **attrs):
    return _zero_state("ssm", batch, p["D"].shape[0], attrs)


@_with_defaults("ssm")
def ssm(u, *, p, state=None, kind, disc, **attrs):
    """Linear time-invariant SSM of `kind` diag (S4D), dense, s5 or shift, run as a recurrence."""
    u = _f64(u)
    if state is None:
        state = ssm_init_state(u.shape[0], p, kind=kind, **attrs)
    y, x = _SSM_KINDS[kind](u, p, state["x"], disc)
    return y, {"x": x}


ssm_step = _step_of(ssm)


# -- selective_ssm --------------------------------------------------------------------------


def _selective_discretize(A, delta_t, disc):
    """dA (B, D, N) and the factor g with dB = g * B_t, from A (D, N) and delta_t (B, D)."""
    return discretizer("diag", disc, "numpy")(A, np.ones_like(A), delta_t[:, :, None])


@_with_defaults("selective_ssm")
def selective_ssm_init_state(batch, p, **attrs):
    return _zero_state("selective_ssm", batch, p["D"].shape[0], {**attrs, "d_state": p["A_log"].shape[1]})


@_with_defaults("selective_ssm")
def selective_ssm(u, delta, B, C, z=None, *, p, state=None, delta_bias, delta_softplus, disc, **attrs):
    """mamba_ssm's selective_scan_ref: x_t = dA_t x_{t-1} + dB_t u_t, y_t = <C_t, x_t> + D u_t,
    then y * silu(z) when z is given."""
    u, delta, B, C = (_f64(a) for a in (u, delta, B, C))
    if delta_bias:
        delta = delta + p["delta_bias"]
    if delta_softplus:
        delta = _softplus(delta)
    A = -np.exp(p["A_log"])                                              # (D, N)
    x = (selective_ssm_init_state(u.shape[0], p, **attrs) if state is None else state)["x"]
    y = np.empty(u.shape)
    for t in range(u.shape[1]):
        dA, g = _selective_discretize(A, delta[:, t], disc)
        x = dA * x + g * B[:, t, None, :] * u[:, t, :, None]
        y[:, t] = np.einsum("bdn,bn->bd", x, C[:, t]) + p["D"] * u[:, t]
    if z is not None:
        y = y * ACTIVATIONS["silu"](_f64(z))
    return y, {"x": x}


selective_ssm_step = _step_of(selective_ssm)


# -- lstm ----------------------------------------------------------------------------------


def _lstm_layer(x, w_ih, w_hh, b, h, c):
    """One torch.nn.LSTM layer over a sequence, gate order i, f, g, o."""
    y = np.empty(x.shape[:2] + (h.shape[-1],))
    for t in range(x.shape[1]):
        i, f, g, o = np.split(x[:, t] @ w_ih.T + h @ w_hh.T + b, 4, axis=-1)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        y[:, t] = h
    return y, h, c


@_with_defaults("lstm")
def lstm_init_state(batch, p, **attrs):
    hidden = p["weight_hh_l0"].shape[1]
    return _zero_state("lstm", batch, p["weight_ih_l0"].shape[1], {**attrs, "hidden": hidden})


@_with_defaults("lstm")
def lstm(x, *, p, state=None, layers, bias, **attrs):
    """Multi-layer torch.nn.LSTM(batch_first=True); state h, c of shape (B, layers, hidden)."""
    x = _f64(x)
    if state is None:
        state = lstm_init_state(x.shape[0], p, layers=layers, **attrs)
    hs, cs = [], []
    for k in range(layers):
        b = p[f"bias_ih_l{k}"] + p[f"bias_hh_l{k}"] if bias else 0.0
        x, h, c = _lstm_layer(x, p[f"weight_ih_l{k}"], p[f"weight_hh_l{k}"], b, state["h"][:, k], state["c"][:, k])
        hs.append(h)
        cs.append(c)
    return x, {"h": np.stack(hs, axis=1), "c": np.stack(cs, axis=1)}


lstm_step = _step_of(lstm)


# -- attention ------------------------------------------------------------------------------


def _head_dim(p, heads):
    d = p["q_proj.weight"].shape[0]
    if d % heads:
        raise SeqcError(f"{d} features do not divide into {heads} heads")
    return d // heads


def _split_heads(x, heads):
    b, length, d = x.shape
    return x.reshape(b, length, heads, d // heads).transpose(0, 2, 1, 3)     # (B, heads, L, hd)


def _softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@_with_defaults("attention")
def attention_init_state(batch, p, *, heads, **_):
    empty = np.zeros((batch, heads, 0, _head_dim(p, heads)))
    return {"k": empty, "v": empty.copy()}


@_with_defaults("attention")
def attention(x, *, p, state=None, heads, bias, **_):
    """Causal multi-head softmax(q k^T / sqrt(head_dim)) v with q/k/v/o projections;
    `state` is a KV cache of earlier positions, which every query may see."""
    x = _f64(x)
    batch, length, d = x.shape
    hd = _head_dim(p, heads)
    q, k, v = (_split_heads(linear(x, p=_sub(p, name), bias=bias), heads) for name in ("q_proj", "k_proj", "v_proj"))
    cache = attention_init_state(batch, p, heads=heads) if state is None else state
    k = np.concatenate([cache["k"], k], axis=2)
    v = np.concatenate([cache["v"], v], axis=2)
    past = cache["k"].shape[2]
    visible = np.arange(past + length)[None, :] <= past + np.arange(length)[:, None]   # (L, T)
    valid = cache.get("valid")               # (B, past): cached keys that are real, not padding
    if valid is not None:
        visible = visible[None] & np.concatenate([valid, np.ones((batch, length), bool)], 1)[:, None, :]
        visible = visible[:, None]           # (B, 1, L, T)
    scores = np.where(visible, q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd), -np.inf)
    out = (_softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(batch, length, d)
    new = {"k": k, "v": v}
    if valid is not None:
        new["valid"] = np.concatenate([valid, np.ones((batch, length), bool)], 1)
    return linear(out, p=_sub(p, "o_proj"), bias=bias), new


attention_step = _step_of(attention)
