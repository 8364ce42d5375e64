"""Weight initialisers, shared by every backend: seeded, deterministic, float64.

``init_weights(graph, seed)`` gives every weight of a graph, keyed exactly like
``graph.weight_shapes()``.  Each layer draws from its own generator, seeded by
``(seed, crc32(layer name))``, so adding or removing a layer leaves the others'
weights unchanged.

The structured initialisers are public so tests and users can call them:

* ``s4d_lin``, ``s4d_inv``, ``s4d_real``: the diagonal S4D initialisations of
  Gu, Gupta, Goel & Re, "On the Parameterization and Initialization of
  Diagonal State Space Models" (NeurIPS 2022).
* ``hippo_legs``: the HiPPO-LegS matrices of Gu, Dao, Ermon, Rudra & Re,
  "HiPPO: Recurrent Memory with Optimal Polynomial Projections" (NeurIPS 2020).
* ``hippo_legs_normal``: the diagonalised normal part of HiPPO-LegS (the
  "normal plus low-rank" form of Gu, Goel & Re, "Efficiently Modeling Long
  Sequences with Structured State Spaces", ICLR 2022), as S5 uses it (Smith,
  Warrington & Linderman, "Simplified State Space Layers for Sequence
  Modeling", ICLR 2023).
* ``mamba_dt_bias``, ``mamba_A_log``: Mamba's initialisation (Gu & Dao,
  "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023).

Layers without a structured initialiser follow PyTorch's defaults
(``nn.Linear``, ``nn.Conv1d``, ``nn.LSTM``, ``nn.Embedding``, norms).
"""
from __future__ import annotations

import math
import zlib

import numpy as np

from .errors import SeqcError
from .ir import join
from .registry import OPS

# -- structured initialisers ------------------------------------------------------


def _modes(N: int) -> int:
    if N % 2:
        raise SeqcError(f"d_state must be even for conjugate-pair modes, got {N}")
    return N // 2


def s4d_lin(H: int, N: int) -> np.ndarray:
    """S4D-Lin: A_n = -1/2 + i pi n for the N/2 modes; complex (H, N/2)."""
    n = np.arange(_modes(N))
    return np.tile(-0.5 + 1j * math.pi * n, (H, 1))


def s4d_inv(H: int, N: int) -> np.ndarray:
    """S4D-Inv: A_n = -1/2 + i N/pi (N/(2n+1) - 1); complex (H, N/2)."""
    n = np.arange(_modes(N))
    return np.tile(-0.5 + 1j * N / math.pi * (N / (2 * n + 1) - 1), (H, 1))


def s4d_real(H: int, N: int) -> np.ndarray:
    """S4D-Real: A_n = -(n+1), zero imaginary part; complex (H, N/2)."""
    n = np.arange(_modes(N))
    return np.tile(-(n + 1.0) + 0j, (H, 1))


def hippo_legs(N: int) -> tuple[np.ndarray, np.ndarray]:
    """HiPPO-LegS: A[n, k] = -sqrt(2n+1) sqrt(2k+1) for n > k, -(n+1) for n = k,
    0 above the diagonal; B[n] = sqrt(2n+1)."""
    r = np.sqrt(2.0 * np.arange(N) + 1.0)
    A = -np.tril(np.outer(r, r), -1) - np.diag(np.arange(N) + 1.0)
    return A, r.copy()


def hippo_legs_normal(N: int) -> tuple[np.ndarray, np.ndarray]:
    """The normal part S = A + P P^T of HiPPO-LegS (P[n] = sqrt(n + 1/2)), diagonalised.

    S = -1/2 I + K with K skew-symmetric, so its eigenvalues are -1/2 + i w with
    i w the eigenvalues of K, in conjugate pairs.  Returns one of each pair (the
    N/2 with w > 0, largest first) and their eigenvectors: ``Lambda (N/2,)``
    complex and ``V (N, N/2)`` complex with orthonormal columns.
    """
    half = _modes(N)
    A, _ = hippo_legs(N)
    P = np.sqrt(np.arange(N) + 0.5)
    S = A + np.outer(P, P)
    K = (S - S.T) / 2.0
    w, V = np.linalg.eigh(-1j * K)              # K V = i w V
    keep = np.argsort(-w)[:half]
    return np.mean(np.diag(S)) + 1j * w[keep], V[:, keep]


def mamba_dt_bias(D: int, dt_min: float, dt_max: float, floor: float, rng: np.random.Generator) -> np.ndarray:
    """Mamba's dt_proj bias: dt log-uniform in [dt_min, dt_max], clamped below at
    `floor`, stored as its inverse softplus dt + log(-expm1(-dt))."""
    log_dt = rng.uniform(size=D) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = np.maximum(np.exp(log_dt), floor)
    return dt + np.log(-np.expm1(-dt))


def mamba_A_log(D: int, N: int) -> np.ndarray:
    """Mamba's S4D-Real A: A_log[d, n] = log(n + 1) for every channel d."""
    return np.tile(np.log(np.arange(1.0, N + 1.0)), (D, 1))


# -- helpers ------------------------------------------------------------------------------


def layer_rng(seed: int, name: str) -> np.random.Generator:
    """The generator of one layer: a stable function of the seed and the layer's name."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


def _uniform(rng, bound, shape):
    return rng.uniform(-bound, bound, size=shape)


def _log_uniform_log(rng, lo, hi, size):
    """log of a log-uniform draw in [lo, hi]: U[log lo, log hi]."""
    return rng.uniform(math.log(lo), math.log(hi), size=size)


# -- per-op initialisers: (weight shapes, attrs, rng) -> {name: array} ------------------------


def _init_linear(shapes, a, rng):
    out_f, in_f = shapes["weight"]
    if a["init"] == "zeros":
        return {"weight": np.zeros((out_f, in_f)), "bias": np.zeros(out_f)}
    if a["init"] == "mamba_dt":          # mamba_ssm dt_proj, dt_init="random", dt_scale=1
        return {"weight": _uniform(rng, in_f ** -0.5, (out_f, in_f)),
                "bias": mamba_dt_bias(out_f, a["dt_min"], a["dt_max"], a["dt_init_floor"], rng)}
    bound = 1.0 / math.sqrt(in_f)        # nn.Linear: kaiming_uniform(a=sqrt(5)) and its bias rule
    return {"weight": _uniform(rng, bound, (out_f, in_f)), "bias": _uniform(rng, bound, out_f)}


def _init_conv1d(shapes, a, rng):
    d, _, k = shapes["weight"]
    bound = 1.0 / math.sqrt(k)           # nn.Conv1d(groups=d): fan_in = kernel size
    return {"weight": _uniform(rng, bound, (d, 1, k)), "bias": _uniform(rng, bound, d)}


def _init_norm(shapes, a, rng):
    d = shapes["weight"][0]
    return {"weight": np.ones(d), "bias": np.zeros(d)}


def _init_embedding(shapes, a, rng):
    return {"weight": rng.standard_normal(shapes["weight"])}


def _init_lstm(shapes, a, rng):
    bound = 1.0 / math.sqrt(a["hidden"])   # nn.LSTM: every weight U(-1/sqrt(hidden), 1/sqrt(hidden))
    return {k: _uniform(rng, bound, s) for k, s in shapes.items()}


def _init_attention(shapes, a, rng):
    out = {}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        lin = _init_linear({"weight": shapes[f"{proj}.weight"]}, {"init": "default"}, rng)
        out.update({f"{proj}.{k}": v for k, v in lin.items()})
    return out


def _init_selective_ssm(shapes, a, rng):
    d, n = shapes["A_log"]
    return {"A_log": mamba_A_log(d, n), "D": np.ones(d),
            "delta_bias": mamba_dt_bias(d, a["dt_min"], a["dt_max"], a["dt_init_floor"], rng)}


_DIAG_A = {
    "s4d-lin": s4d_lin, "s4d-inv": s4d_inv, "s4d-real": s4d_real,
    "hippo-legs": lambda H, N: np.tile(hippo_legs_normal(N)[0], (H, 1)),   # S4D-LegS
}


def _init_ssm_diag(shapes, a, rng):
    """S4D: A from `init`, log_dt ~ U[log dt_min, log dt_max], C ~ CN(0, 1), D ~ N(0, 1)."""
    H, M = shapes["log_A_real"]
    A = _DIAG_A[a["init"]](H, 2 * M)
    return {"log_dt": _log_uniform_log(rng, a["dt_min"], a["dt_max"], H),
            "log_A_real": np.log(-A.real), "A_imag": A.imag.copy(),
            "C": rng.normal(0.0, math.sqrt(0.5), (H, M, 2)), "D": rng.standard_normal(H)}


def _init_ssm_dense(shapes, a, rng):
    """Dense A: HiPPO-LegS (B = hippo B) or S4D-Real -diag(n+1) (B = 1, as S4D); C ~ N(0, 1/N)."""
    H, N = shapes["B"]
    if a["init"] == "hippo-legs":
        A, b = hippo_legs(N)
    elif a["init"] == "s4d-real":
        A, b = -np.diag(np.arange(1.0, N + 1.0)), np.ones(N)
    else:
        raise SeqcError(f"init={a['init']} needs kind=diag; a dense A takes hippo-legs or s4d-real")
    return {"log_dt": _log_uniform_log(rng, a["dt_min"], a["dt_max"], H), "A": A, "B": np.tile(b, (H, 1)),
            "C": rng.standard_normal((H, N)) / math.sqrt(N), "D": rng.standard_normal(H)}


def _init_ssm_s5(shapes, a, rng):
    """S5 with the HiPPO-N initialisation (whatever `init` says): Lambda and V from
    hippo_legs_normal; B = V^H B0 with B0 ~ N(0, 1/H) real (N, H); C = C0 V with
    C0 complex, real and imaginary parts ~ N(0, 1/(2N)); log_step ~ U[log dt_min, log dt_max]."""
    P, H = shapes["B"][:2]
    N = 2 * P
    Lam, V = hippo_legs_normal(N)
    B = V.conj().T @ (rng.standard_normal((N, H)) / math.sqrt(H))
    C = rng.normal(0.0, math.sqrt(0.5 / N), (H, N, 2))
    C = (C[..., 0] + 1j * C[..., 1]) @ V
    pairs = lambda z: np.stack([z.real, z.imag], axis=-1)   # noqa: E731
    return {"log_step": _log_uniform_log(rng, a["dt_min"], a["dt_max"], P), "Lambda_re": Lam.real.copy(),
            "Lambda_im": Lam.imag.copy(), "B": pairs(B), "C": pairs(C), "D": rng.standard_normal(H)}


def _init_ssm_shift(shapes, a, rng):
    H, N = shapes["C"]
    return {"C": rng.standard_normal((H, N)) / math.sqrt(N), "D": rng.standard_normal(H)}


_SSM_KINDS = {"diag": _init_ssm_diag, "dense": _init_ssm_dense, "s5": _init_ssm_s5, "shift": _init_ssm_shift}


def _init_ssm(shapes, a, rng):
    return _SSM_KINDS[a["kind"]](shapes, a, rng)


INITIALISERS = {
    "linear": _init_linear, "conv1d": _init_conv1d, "layernorm": _init_norm, "rmsnorm": _init_norm,
    "embedding": _init_embedding, "lstm": _init_lstm, "attention": _init_attention,
    "selective_ssm": _init_selective_ssm, "ssm": _init_ssm,
}


def init_layer(op: str, shapes: dict, attrs: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The initial weights of one layer, given its weight shapes and attributes."""
    spec = OPS[op]
    full = {**spec.defaults, **attrs}
    drawn = INITIALISERS[op](shapes, full, rng)
    out = {}
    for k, s in shapes.items():
        w = np.asarray(drawn[k], dtype=np.float64)
        assert w.shape == tuple(s), f"{op}.{k}: initialised {w.shape}, declared {tuple(s)}"
        out[k] = w
    return out


def init_weights(graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Every weight of `graph`, float64, keyed exactly like ``graph.weight_shapes()``."""
    out = {}
    for node in graph.order():
        shapes = {k: tuple(int(d) for d in s) for k, s in node.weight_shapes().items()}
        if shapes:
            layer = init_layer(node.op, shapes, node.attrs, layer_rng(seed, node.name))
            out.update({join(node.name, k): w for k, w in layer.items()})
    return out
