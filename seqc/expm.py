"""Batched matrix exponential for NumPy, so the runtime does not need SciPy.

Owns ``expm(M)``: the scaling-and-squaring algorithm with a degree-13 Padé
approximant (Higham 2005, "The scaling and squaring method for the matrix
exponential revisited"), applied to a stack of square matrices ``(..., N, N)``,
real or complex.  Degree 13 is used for every norm (accurate to working
precision whenever ``||M / 2**s||_1 <= theta_13``); the cheaper low-degree
variants of the paper are an optimisation we do not need for the small
matrices of state-space discretization.
"""
from __future__ import annotations

import numpy as np

# Coefficients of the [13/13] Padé approximant of exp (Higham 2005, Table 10.4).
_PADE13 = (64764752532480000.0, 32382376266240000.0, 7771770303897600.0,
           1187353796428800.0, 129060195264000.0, 10559470521600.0, 670442572800.0,
           33522128640.0, 1323241920.0, 40840800.0, 960960.0, 16380.0, 182.0, 1.0)
_THETA13 = 5.371920351148152


def _scaling_exponents(M: np.ndarray) -> np.ndarray:
    """Per matrix, the s >= 0 with ||M / 2**s||_1 <= theta_13."""
    norm = np.abs(M).sum(axis=-2).max(axis=-1)
    with np.errstate(divide="ignore"):
        s = np.ceil(np.log2(norm / _THETA13))
    return np.where(np.isfinite(s) & (s > 0), s, 0).astype(np.int64)


def _pade13(M: np.ndarray) -> np.ndarray:
    """The [13/13] Padé approximant r(M) = (V - U)^-1 (V + U) of exp(M)."""
    b = _PADE13
    eye = np.broadcast_to(np.eye(M.shape[-1], dtype=M.dtype), M.shape)
    M2 = M @ M
    M4 = M2 @ M2
    M6 = M4 @ M2
    U = M @ (M6 @ (b[13] * M6 + b[11] * M4 + b[9] * M2)
             + b[7] * M6 + b[5] * M4 + b[3] * M2 + b[1] * eye)
    V = (M6 @ (b[12] * M6 + b[10] * M4 + b[8] * M2)
         + b[6] * M6 + b[4] * M4 + b[2] * M2 + b[0] * eye)
    return np.linalg.solve(V - U, V + U)


def expm(M) -> np.ndarray:
    """exp(M) for a square matrix or a stack ``(..., N, N)`` of them."""
    M = np.asarray(M)
    if M.ndim < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"expm needs square matrices, got shape {M.shape}")
    if not np.issubdtype(M.dtype, np.inexact):
        M = M.astype(np.float64)
    s = _scaling_exponents(M)
    scale = np.ldexp(1.0, -s).astype(M.real.dtype)[..., None, None]
    R = _pade13(M * scale)
    for k in range(int(s.max(initial=0))):
        R = np.where((s > k)[..., None, None], R @ R, R)
    return R
