"""ssm: linear time-invariant state-space layers - kinds ``diag`` (S4D), ``dense``
(one shared dense A), ``s5`` (MIMO S5) and ``shift`` (H3's shift SSM).

Owns the spec and shape / weight / state rules, the NumPy reference with its
three plans, the structured initialisers (S4D, HiPPO), the planner's cost
options and the fusion / discretization traits.

State layouts (batch first): diag ``x (B, H, N/2, 2)`` (complex modes as
(real, imag)); dense ``x (B, H, N)``; s5 ``x (B, N/2, 2)``; shift ``x (B, H, N)``,
the last N inputs, newest first.  Conjugate-pair convention (diag, s5): each
stored complex mode stands for itself and its conjugate, so ``y = 2 Re(C x) + D u``.

Plans of the reference (all exact in float64, they differ only in rounding):

* ``recurrent`` (and None / ``auto``): ``x_t = Abar x_{t-1} + Bbar u_t`` one step at a time.
* ``conv``: the kernel ``K[l] = C Abar^l Bbar`` built from powers of Abar (the
  Vandermonde sum for diag / s5, matrix powers for dense, the taps C for
  shift), a direct causal convolution ``sum_j K[t-j] u_j``, plus the free
  response ``C Abar^{t+1} x_0`` of the initial state; the final state is
  ``Abar^L x_0 + sum_j Abar^{L-1-j} Bbar u_j``.
* ``scan``: the same closed form within chunks of ``CHUNK`` steps (powers up
  to the chunk length only), the state carried from chunk to chunk.
"""
from __future__ import annotations

import math

import numpy as np

from ..discretization import discretizer
from ..errors import SeqcError
from ._direction import with_direction
from .base import (DT_ATTRS, PLANS, Attr, OpSpec, PlanOption, ShapeError, Traits, check_dt_range, f64, itemsize,
                   last, log_uniform_log, register_op, seq_shape, with_defaults, zero_state)

CHUNK = 8          # the reference scan plan's chunk length
CONV_OPS = 85      # batched ops of the torch conv plan (kernel by blocked Vandermonde products, rfft, irfft)

# -- structured initialisers (public, re-exported by seqc.init) ---------------------------


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


_DIAG_A = {
    "s4d-lin": s4d_lin, "s4d-inv": s4d_inv, "s4d-real": s4d_real,
    "hippo-legs": lambda H, N: np.tile(hippo_legs_normal(N)[0], (H, 1)),   # S4D-LegS
}


def legs_input_scale(N: int) -> np.ndarray:
    """|B~_n| for S4D-LegS: HiPPO-LegS's B in the eigenbasis of its normal part,
    B~ = V^H B (V from ``hippo_legs_normal``), one magnitude per kept mode (N/2,)."""
    _, V = hippo_legs_normal(N)
    return np.abs(V.conj().T @ hippo_legs(N)[1])


def _init_diag(shapes, a, rng):
    """S4D: A from `init`, log_dt ~ U[log dt_min, log dt_max], C ~ CN(0, 1), D ~ N(0, 1).

    The diag kind has no B parameter (S4D's B is all ones and C absorbs it): with
    ``init = hippo-legs`` (S4D-LegS) mode n's input scale |B~_n| from diagonalising
    HiPPO-LegS's B (``legs_input_scale``) is folded into C, i.e. C_n ~ |B~_n| CN(0, 1).
    Only the magnitude is folded: B~_n's phase depends on the eigenvectors' arbitrary
    phases, and C's distribution is invariant under a phase anyway."""
    H, M = shapes["log_A_real"]
    A = _DIAG_A[a["init"]](H, 2 * M)
    C = rng.normal(0.0, math.sqrt(0.5), (H, M, 2))
    if a["init"] == "hippo-legs":
        C = C * legs_input_scale(2 * M)[None, :, None]
    return {"log_dt": log_uniform_log(rng, a["dt_min"], a["dt_max"], H),
            "log_A_real": np.log(-A.real), "A_imag": A.imag.copy(),
            "C": C, "D": rng.standard_normal(H)}


def _init_dense(shapes, a, rng):
    """Dense A: HiPPO-LegS (B = hippo B) or S4D-Real -diag(n+1) (B = 1, as S4D); C ~ N(0, 1/N)."""
    H, N = shapes["B"]
    if a["init"] == "hippo-legs":
        A, b = hippo_legs(N)
    elif a["init"] == "s4d-real":
        A, b = -np.diag(np.arange(1.0, N + 1.0)), np.ones(N)
    else:
        raise SeqcError(f"init={a['init']} needs kind=diag; a dense A takes hippo-legs or s4d-real")
    return {"log_dt": log_uniform_log(rng, a["dt_min"], a["dt_max"], H), "A": A, "B": np.tile(b, (H, 1)),
            "C": rng.standard_normal((H, N)) / math.sqrt(N), "D": rng.standard_normal(H)}


def _init_s5(shapes, a, rng):
    """S5 with the HiPPO-N initialisation (whatever `init` says): Lambda and V from
    hippo_legs_normal; B = V^H B0 with B0 ~ N(0, 1/H) real (N, H); C = C0 V with
    C0 complex, real and imaginary parts ~ N(0, 1/(2N)); log_step ~ U[log dt_min, log dt_max]."""
    P, H = shapes["B"][:2]
    N = 2 * P
    Lam, V = hippo_legs_normal(N)
    B = V.conj().T @ (rng.standard_normal((N, H)) / math.sqrt(H))
    C = rng.normal(0.0, math.sqrt(0.5 / N), (H, N, 2))
    C = (C[..., 0] + 1j * C[..., 1]) @ V
    return {"log_step": log_uniform_log(rng, a["dt_min"], a["dt_max"], P), "Lambda_re": Lam.real.copy(),
            "Lambda_im": Lam.imag.copy(), "B": _to_pairs(B), "C": _to_pairs(C), "D": rng.standard_normal(H)}


def _init_shift(shapes, a, rng):
    H, N = shapes["C"]
    return {"C": rng.standard_normal((H, N)) / math.sqrt(N), "D": rng.standard_normal(H)}


_INIT = {"diag": _init_diag, "dense": _init_dense, "s5": _init_s5, "shift": _init_shift}


def init_ssm(shapes, a, rng):
    return _INIT[a["kind"]](shapes, a, rng)


# -- the discrete systems of each kind ----------------------------------------------------


def _to_complex(pairs):
    return pairs[..., 0] + 1j * pairs[..., 1]


def _to_pairs(z):
    return np.stack([z.real, z.imag], axis=-1)


class _System:
    """One kind's discrete system in its own state layout: ``power(k)`` is Abar^k,
    ``apply(P, x)`` applies such a power to states (B, ...), ``inject(u_t)`` is
    Bbar u_t, ``read(x)`` the readout C x (without D u).  ``mimo``: the channels
    share one state (s5), so the kernel is an (H, H) matrix per lag."""

    mimo = False

    def advance(self, x, u_t):
        return self.apply(self.power(1), x) + self.inject(u_t)


class _Diag(_System):
    """S4D: H channels of N/2 complex modes, dA = disc(A), dB = disc(B = 1), C absorbs B."""

    def __init__(self, p, discretize):
        A = -np.exp(p["log_A_real"]) + 1j * p["A_imag"]                       # (H, N/2)
        self.dA, self.dB = discretize(A, np.ones_like(A), np.exp(p["log_dt"])[:, None])
        self.C = _to_complex(p["C"])

    def power(self, k):
        return self.dA ** k                                                   # Vandermonde entries

    def apply(self, P, x):
        return P * x

    def inject(self, u_t):
        return self.dB * u_t[:, :, None]

    def read(self, x):
        return 2.0 * (self.C * x).sum(axis=-1).real

    to_state, from_state = staticmethod(_to_complex), staticmethod(_to_pairs)


class _Dense(_System):
    """One dense A (N, N) shared by all channels, per-channel B_h, C_h and step dt_h."""

    def __init__(self, p, discretize):
        n = p["A"].shape[0]
        # Bbar_h = G_h B_h with G_h = disc(B = I): N x N blocks, not (N + H)-sized ones per channel
        self.Abar, gain = discretize(p["A"], np.eye(n), np.exp(p["log_dt"]))   # (H, N, N)
        self.Bbar = np.einsum("hnm,hm->hn", gain, p["B"])                      # (H, N)
        self.C = p["C"]
        self._powers = [np.broadcast_to(np.eye(n), self.Abar.shape)]

    def power(self, k):
        while len(self._powers) <= k:                                         # matrix powers by products
            self._powers.append(np.einsum("hnm,hmk->hnk", self._powers[-1], self.Abar))
        return self._powers[k]

    def apply(self, P, x):
        return np.einsum("hnm,bhm->bhn", P, x)

    def inject(self, u_t):
        return self.Bbar * u_t[:, :, None]

    def read(self, x):
        return (self.C * x).sum(axis=-1)

    to_state = from_state = staticmethod(lambda x: x)


class _S5(_System):
    """MIMO S5: one state of N/2 complex modes, x_t = Lbar x + Bbar u_t, y = 2 Re(C x) + D u."""

    mimo = True

    def __init__(self, p, discretize):
        Lam = p["Lambda_re"] + 1j * p["Lambda_im"]                           # (P,)
        self.Lbar, gain = discretize(Lam, np.ones_like(Lam), np.exp(p["log_step"]))
        self.Bbar = gain[:, None] * _to_complex(p["B"])                      # (P, H)
        self.C = _to_complex(p["C"])                                         # (H, P)

    def power(self, k):
        return self.Lbar ** k

    def apply(self, P, x):
        return P * x

    def inject(self, u_t):
        return u_t @ self.Bbar.T

    def read(self, x):
        return 2.0 * (x @ self.C.T).real

    to_state, from_state = staticmethod(_to_complex), staticmethod(_to_pairs)


class _Shift(_System):
    """H3's shift SSM: x is the last N inputs (newest first), y = sum_n C[h, n] x[n] + D u;
    Abar^k shifts the window by k places, Bbar u_t writes u_t at position 0."""

    def __init__(self, p, discretize):
        self.C = p["C"]

    def power(self, k):
        return k

    def apply(self, k, x):
        if k == 0:
            return x
        out = np.zeros_like(x)
        out[..., k:] = x[..., :max(x.shape[-1] - k, 0)]
        return out

    def advance(self, x, u_t):
        return np.concatenate([u_t[:, :, None], x[:, :, :-1]], axis=-1)

    def inject(self, u_t):
        x = np.zeros(u_t.shape + (self.C.shape[1],))
        x[..., 0] = u_t
        return x

    def read(self, x):
        return (self.C * x).sum(axis=-1)

    to_state = from_state = staticmethod(lambda x: x)


_SYSTEMS = {"diag": _Diag, "dense": _Dense, "s5": _S5, "shift": _Shift}


def structure(kind: str) -> str | None:
    """The discretization structure of a kind (None: the shift SSM is already discrete)."""
    return None if kind == "shift" else ("dense" if kind == "dense" else "diag")


# -- the three plans ------------------------------------------------------------------------


def _recurrence(sys, u, x):
    y = np.empty(u.shape)
    for t in range(u.shape[1]):
        x = sys.advance(x, u[:, t])
        y[:, t] = sys.read(x)
    return y, x


def _kernel(sys, length, channels):
    """K[l] = C Abar^l Bbar for l < length: (length, H) per channel, or (length, H_in, H_out) for MIMO."""
    impulse = np.eye(channels) if sys.mimo else np.ones((1, channels))
    return np.stack([sys.read(sys.apply(sys.power(lag), sys.inject(impulse))) for lag in range(length)])


def _closed_form(sys, u, x0, K):
    """Outputs (without D u) and final state of `u` from state x0, with kernel K of >= L lags:
    y_t = sum_{j<=t} K[t-j] u_j + C Abar^{t+1} x0, x_L = Abar^L x0 + sum_j Abar^{L-1-j} Bbar u_j."""
    length = u.shape[1]
    y = np.stack([sys.read(sys.apply(sys.power(t + 1), x0)) for t in range(length)], axis=1)   # free response
    for lag in range(length):                                                    # direct causal convolution
        y[:, lag:] += u[:, :length - lag] @ K[lag] if sys.mimo else u[:, :length - lag] * K[lag, 0]
    x = sys.apply(sys.power(length), x0)
    for j in range(length):
        x = x + sys.apply(sys.power(length - 1 - j), sys.inject(u[:, j]))
    return y, x


def _conv(sys, u, x0):
    return _closed_form(sys, u, x0, _kernel(sys, u.shape[1], u.shape[2]))


def _chunked(sys, u, x0, chunk=CHUNK):
    K = _kernel(sys, min(chunk, u.shape[1]), u.shape[2])
    ys, x = [], x0
    for start in range(0, u.shape[1], chunk):
        y, x = _closed_form(sys, u[:, start:start + chunk], x, K)
        ys.append(y)
    return np.concatenate(ys, axis=1), x


_PLAN_FNS = {None: _recurrence, "auto": _recurrence, "recurrent": _recurrence, "conv": _conv, "scan": _chunked}


@with_defaults("ssm")
def ssm_init_state(batch, p, **attrs):
    return zero_state("ssm", batch, p["D"].shape[0], attrs)


@with_defaults("ssm")
def ssm(u, *, p, state=None, plan=None, discretize=None, kind, disc, **attrs):
    """Linear time-invariant SSM of `kind` diag (S4D), dense, s5 or shift, run by `plan`
    (recurrent / conv / scan, see the module docstring); `discretize(A, B, dt) -> (Abar, Bbar)`
    defaults to the derived NumPy discretization of `disc`."""
    u = f64(u)
    if plan not in _PLAN_FNS:
        raise SeqcError(f"ssm has no plan {plan!r}; expected recurrent, conv or scan")
    if state is None:
        state = ssm_init_state(u.shape[0], p, kind=kind, **attrs)
    if discretize is None and structure(kind) is not None:
        discretize = discretizer(structure(kind), disc, "numpy")
    sys = _SYSTEMS[kind](p, discretize)
    run = _PLAN_FNS[plan] if u.shape[1] else _recurrence         # an empty sequence: nothing to convolve
    y, x = run(sys, u, sys.to_state(f64(state["x"])))
    return y + p["D"] * u, {"x": sys.from_state(x)}


# -- spec -----------------------------------------------------------------------------------


def _weights(s, a):
    h = int(last(s[0]))
    n = a["d_state"]
    kind = a["kind"]
    if kind == "diag":
        return {"log_dt": (h,), "log_A_real": (h, n // 2), "A_imag": (h, n // 2), "C": (h, n // 2, 2), "D": (h,)}
    if kind == "dense":
        return {"log_dt": (h,), "A": (n, n), "B": (h, n), "C": (h, n), "D": (h,)}
    if kind == "s5":
        p = n // 2
        return {"log_step": (p,), "Lambda_re": (p,), "Lambda_im": (p,), "B": (p, h, 2), "C": (h, p, 2), "D": (h,)}
    if kind == "shift":
        return {"C": (h, n), "D": (h,)}
    raise AssertionError(kind)


def _state(s, a):
    h, n, kind = int(last(s[0])), a["d_state"], a["kind"]
    if kind == "diag":
        return {"x": (h, n // 2, 2)}       # complex modes as (re, im)
    if kind == "s5":
        return {"x": (n // 2, 2)}
    return {"x": (h, n)}


def _shape(s, a):
    out = seq_shape(s, a)
    if a["kind"] in ("diag", "s5") and a["d_state"] % 2:
        raise ShapeError(f"d_state must be even for kind={a['kind']} (conjugate pairs), got {a['d_state']}")
    if a["kind"] == "dense" and a["init"] not in ("hippo-legs", "s4d-real"):
        raise ShapeError(f"init={a['init']} needs kind=diag; a dense A takes hippo-legs or s4d-real")
    return out


def plan_options(node, ctx, m) -> list[PlanOption]:
    """FFT convolution, chunked scan and recurrence, costed for the node's shapes."""
    B, L, s = ctx.batch, ctx.length, itemsize(ctx)
    H = int(node.input_shapes[0][-1])
    kind, N = node.attrs["kind"], node.attrs["d_state"]
    modes = {"diag": N // 2, "s5": N // 2, "dense": N, "shift": N}[kind]
    cplx = 2 if kind in ("diag", "s5") else 1
    per_step = modes * (N if kind == "dense" else 1)        # dense: an N x N mat-vec per step
    width = 1 if kind == "s5" else H                         # s5: one state shared by the channels
    nfft = 1 << max(1, math.ceil(math.log2(2 * L)))
    fft_flops = B * H * 5 * nfft * math.log2(nfft) * 2
    vander = (H * H if kind == "s5" else H) * modes * L      # kernel powers, once per call
    states = B * width * per_step * L
    if kind in ("diag", "s5") and "lti_kernel" in m["ns"]:
        return _kernel_plan_options(m, B, H, L, s, modes, vander, nfft, states)
    # conv: ~85 batched ops whatever L (kernel by blocked Vandermonde products, rfft, irfft)
    conv = PlanOption("conv", CONV_OPS, vander + B * H * nfft, m["ns"]["conv"],
                      vander * 8 * cplx + fft_flops, s * cplx * (vander + B * H * nfft), batched=True)
    scan = PlanOption("scan", 3 * math.sqrt(L), states, m["ns"]["scan"], states * 4 * cplx, s * cplx * states * 3)
    history = s * cplx * states * 2
    rec_ns = m["ns"]["recurrent"] if history <= m["llc"] else m["ns"]["recurrent_dram"]
    rec = PlanOption("recurrent", L, states, rec_ns, states * 4 * cplx, history)
    return [conv, scan, rec]


LTI_KERNEL_OPS = 10      # batched ops around the generated diagonal-recurrence kernel


def _kernel_plan_options(m, B, H, L, s, modes, vander, nfft, states) -> list[PlanOption]:
    """Costs where the machine runs the complex diagonal recurrence as one generated
    kernel (the torch CPU backend's numba kernels): the scan and recurrent plans are
    then that same kernel (no loop over time outside it), and the FFT convolution is
    the Vandermonde kernel plus rfft/irfft, priced per element and per FFT butterfly.
    Figures fitted with ``benchmarks/bench_plans.py --cpu-time`` (forward and ``--train``)."""
    ns = m["ns"]
    butterflies = B * H * nfft * math.log2(nfft)
    conv = PlanOption("conv", CONV_OPS, vander + butterflies * ns["lti_fft"] / ns["lti_conv"], ns["lti_conv"],
                      vander * 16 + butterflies * 10, s * 2 * (vander + B * H * nfft), batched=True,
                      train_steps=ns["lti_conv_train_steps"], train_elements=ns["lti_conv_train"])
    kernel = dict(steps=LTI_KERNEL_OPS, elements=states, ns_per_element=ns["lti_kernel"], flops=states * 8,
                  working_set=s * 2 * states * 2, batched=True,
                  train_elements=ns["lti_kernel_train"] / ns["lti_kernel"])
    return [conv, PlanOption("scan", **kernel), PlanOption("recurrent", **kernel)]


def _discretization(node):
    st = structure(node.attrs["kind"])
    return None if st is None else (st, node.attrs["disc"])


register_op(with_direction(OpSpec("ssm", ("u",), (
    Attr("d_state", "int", 64, positive=True, max=4096),
    Attr("kind", "enum", "diag", ("diag", "dense", "s5", "shift"),
         doc="diag: S4D; dense: shared dense A (small N); s5: MIMO S5; shift: H3's shift SSM"),
    Attr("init", "enum", "s4d-lin", ("s4d-lin", "s4d-inv", "s4d-real", "hippo-legs"), init_only=True),
    Attr("disc", "enum", "zoh", ("zoh", "bilinear", "euler", "backward_euler")),
    Attr("plan", "enum", "auto", PLANS),
    *DT_ATTRS[:2],
), shape=_shape, weights=_weights, state=_state, time_invariant=True,
   doc="linear time-invariant state-space layer (S4D by default)",
   reference=ssm, reference_init_state=ssm_init_state, init=init_ssm, plan_options=plan_options,
   validate=check_dt_range,
   traits=Traits(anchor=True, time_invariant=True, discretization=_discretization,
                 fused=lambda n: [f"discretize[{n.attrs['disc']}]", "kernel/scan", "D-skip"]))))
