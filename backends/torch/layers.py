"""The torch runtime layers: one ``nn.Module`` per registry op with weights or state.

``LAYERS[op](in_features, attrs)`` builds a layer; ``in_features[k]`` is the
last dimension of input k and ``attrs`` the node's attributes (registry
defaults fill the missing ones).  Parameters carry exactly the registry's
weight names and shapes, initialised to zeros (the compile step loads values).

Every layer has ``forward(*inputs, state=None, return_state=False, lengths=None)``
(returning ``y`` or ``(y, final_state)``), ``init_state(batch, dtype, device)``
and ``step(*inputs_t, state) -> (y_t, new_state)``.  States are dicts of
tensors, batch first, in the layouts of ``backends/numpy/ops.py``:

* conv1d ``window (B, D, K-1)``; ssm ``x`` (diag ``(B, H, N/2, 2)`` and s5
  ``(B, N/2, 2)`` complex as (re, im), dense / shift ``(B, H, N)``);
  selective_ssm ``x (B, D, N)``; lstm ``h``, ``c`` ``(B, layers, hidden)``;
  attention ``k``, ``v`` ``(B, heads, T, head_dim)`` plus ``valid (B, T)``
  (bool) once a ``lengths=`` call has left padding in the cache.

``lengths`` (``(B,)`` integers): outputs before each sequence's length equal
running it alone and the final state is the state after exactly that many
steps.  SSM states accumulate in float32 (float64 for float64 inputs), with
autocast off, whatever the input precision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from seqc.discretization import discretizer
from seqc.errors import SeqcError
from seqc.registry import OPS, REQUIRED

from . import scan
from .functional import activation

HALF = (torch.float16, torch.bfloat16)
SMALL_STATE = 8192      # linear_scan: states with fewer elements per step are scanned in chunks

# -- helpers ---------------------------------------------------------------------------


def with_defaults(op: str, attrs: dict) -> dict:
    """The node's attributes completed with the registry's defaults."""
    spec = OPS[op]
    out = {a.name: a.default for a in spec.attrs if a.default is not REQUIRED}
    out.update(attrs)
    missing = [a.name for a in spec.attrs if a.name not in out]
    if missing:
        raise SeqcError(f"{op}: missing attribute {', '.join(missing)}")
    return out


def _shapes(in_features) -> list[tuple]:
    """Stand-in input shapes (1, 1, features) for the registry's weight / state rules."""
    return [(1, 1, int(f)) for f in in_features]


def work_dtype(*tensors) -> torch.dtype:
    """The promoted float dtype of `tensors`, with half precision raised to float32."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype in HALF or not dtype.is_floating_point else dtype


def _out_dtype(dtype, work):
    """Outputs keep a half-precision input's dtype, otherwise the compute dtype."""
    return dtype if dtype in HALF else work


def _state_dtype(dtype) -> torch.dtype:
    """State precision: float64 stays, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_autocast(x):
    return torch.autocast(device_type=x.device.type, enabled=False)


def check_lengths(lengths, x, minimum: int = 0):
    """`lengths` as a LongTensor (B,) on x's device with minimum <= length <= L, or None."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths, device=x.device)
    batch, length = x.shape[:2]
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or tuple(lengths.shape) != (batch,):
        raise SeqcError(f"lengths must be {batch} integers (one per sequence), got {tuple(lengths.shape)} "
                        f"{lengths.dtype}")
    lengths = lengths.long()
    if bool((lengths < minimum).any()) or bool((lengths > length).any()):
        raise SeqcError(f"lengths must lie in [{minimum}, {length}], got {lengths.tolist()}")
    return lengths


def at_positions(x, index):
    """x[b, index[b]] for x (B, T, ...)."""
    return x[torch.arange(x.shape[0], device=x.device), index]


def _from_zero(x):
    """States (B, L, ...) after 1..L steps, with the zero state before them: index = steps taken."""
    return torch.cat([torch.zeros_like(x[:, :1]), x], 1)


def right_align(u, lengths):
    """Shift each sequence so that its first `length` steps end at the last position (zeros before)."""
    batch, length = u.shape[:2]
    src = torch.arange(length, device=u.device)[None, :] - (length - lengths)[:, None]   # (B, L)
    valid = (src >= 0).view(batch, length, *(1,) * (u.dim() - 2))
    index = src.clamp(min=0).view(batch, length, *(1,) * (u.dim() - 2)).expand_as(u)
    return torch.where(valid, u.gather(1, index), torch.zeros((), dtype=u.dtype, device=u.device))


# -- base classes -------------------------------------------------------------------------


class Layer(nn.Module):
    """Attributes with defaults and the registry's weights as zero parameters."""

    op: str = ""

    def __init__(self, in_features, attrs: dict):
        super().__init__()
        self.in_features = [int(f) for f in in_features]
        self.attrs = with_defaults(self.op, dict(attrs))
        self._build(OPS[self.op].weights(_shapes(self.in_features), self.attrs))

    def _build(self, shapes: dict) -> None:
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.attrs.items())

    def init_state(self, batch: int, dtype=torch.float32, device=None) -> dict:
        return {}


class Pointwise(Layer):
    """A weighted layer acting on each position alone: state passes through untouched."""

    def map(self, x):
        raise NotImplementedError

    def forward(self, x, state=None, return_state=False, lengths=None):
        y = self.map(x)
        return (y, state if state is not None else {}) if return_state else y

    def step(self, x_t, state=None):
        return self.map(x_t), state if state is not None else {}


class Recurrent(Layer):
    """A layer with a recurrent state; `step` defaults to forward on a length-1 sequence."""

    def state_dtype(self, dtype):
        return dtype

    def init_state(self, batch: int, dtype=torch.float32, device=None) -> dict:
        shapes = OPS[self.op].state(_shapes(self.in_features), self.attrs)
        dtype = self.state_dtype(dtype)
        return {k: torch.zeros((batch,) + tuple(s), dtype=dtype, device=device) for k, s in shapes.items()}

    def step(self, *inputs_t, state=None):
        seq = [None if x is None else x.unsqueeze(1) for x in inputs_t]
        y, new_state = self(*seq, state=state, return_state=True)
        return y[:, 0], new_state


# -- pointwise layers -----------------------------------------------------------------------


class Linear(Pointwise):
    op = "linear"

    def map(self, x):
        return F.linear(x, self.weight, getattr(self, "bias", None))


class LayerNorm(Pointwise):
    op = "layernorm"

    def map(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, getattr(self, "bias", None), self.attrs["eps"])


class RMSNorm(Pointwise):
    op = "rmsnorm"

    def map(self, x):
        """x * rsqrt(mean(x^2) + eps) * weight, computed in at least float32."""
        work = work_dtype(x, self.weight)
        xw = x.to(work)
        y = xw * torch.rsqrt(xw.pow(2).mean(-1, keepdim=True) + self.attrs["eps"]) * self.weight.to(work)
        return y.to(_out_dtype(x.dtype, work))


class Embedding(Pointwise):
    op = "embedding"

    def map(self, tokens):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex:
            raise SeqcError(f"embedding needs integer tokens, got {tokens.dtype}")
        return F.embedding(tokens, self.weight)


# -- conv1d ----------------------------------------------------------------------------------


class Conv1d(Recurrent):
    """Causal depthwise convolution over time (torch Conv1d groups=D layout), then `activation`."""

    op = "conv1d"

    def forward(self, x, state=None, return_state=False, lengths=None):
        lengths = check_lengths(lengths, x)
        batch, length, d = x.shape
        taps = self.weight.shape[-1]
        window = (x.new_zeros(batch, d, taps - 1) if state is None else state["window"].to(x.dtype))
        padded = torch.cat([window, x.transpose(1, 2)], -1)                # (B, D, K-1+L)
        y = F.conv1d(padded, self.weight, getattr(self, "bias", None), groups=d)
        y = activation(self.attrs["activation"])(y).transpose(1, 2)
        if not return_state:
            return y
        return y, {"window": self._last_inputs(padded, lengths, taps - 1)}

    def step(self, x_t, state=None):
        """One token: a dot product of the window with the taps (no convolution call)."""
        if state is None:
            state = self.init_state(x_t.shape[0], x_t.dtype, x_t.device)
        full = torch.cat([state["window"].to(x_t.dtype), x_t.unsqueeze(-1)], -1)      # (B, D, K)
        y = (full * self.weight[:, 0, :]).sum(-1)
        bias = getattr(self, "bias", None)
        if bias is not None:
            y = y + bias
        return activation(self.attrs["activation"])(y), {"window": full[..., 1:]}

    @staticmethod
    def _last_inputs(padded, lengths, count):
        """The `count` inputs before each sequence's end: padded positions [length, length + count)."""
        if lengths is None:
            return padded[..., padded.shape[-1] - count:]
        index = lengths[:, None] + torch.arange(count, device=padded.device)[None, :]
        return padded.gather(-1, index[:, None, :].expand(-1, padded.shape[1], -1))


# -- ssm: linear time-invariant systems ------------------------------------------------------


@dataclass
class LinearSystem:
    """A discretized LTI system x_t = a x_{t-1} + inject(u_t), y_t = read(x_t) (+ D u_t by the caller).

    ``transition`` says how ``a`` acts: ``"diag"`` (elementwise, possibly
    complex), ``"matrix"`` (``a @ x`` over the last axis) or ``"shift"`` (``a``
    an int: move the last axis down by ``a`` places, zeros in).  SISO systems
    (``mimo=False``) have a state ``(H, S)`` driven channel by channel by
    ``Bbar (H, S)``; MIMO ones a state ``(P,)`` driven by ``Bbar (P, H)``.
    Complex systems stand for conjugate pairs and read ``2 Re(C x)``.
    """

    a: object
    transition: str
    Bbar: torch.Tensor
    C: torch.Tensor
    mimo: bool = False
    complex: bool = False

    def apply(self, p, x):
        """p x for p a power of a (broadcast over leading axes of x)."""
        if self.transition == "matrix":   # einsum: a batched matmul would expand p to x's batch
            return torch.einsum("...hnm,...hm->...hn", p, x)
        if self.transition == "shift":
            n = x.shape[-1]
            return F.pad(x[..., :max(n - p, 0)], (min(p, n), 0))
        return p * x

    def compose(self, p, q):
        """The transition p q (p after q) for powers p, q of a."""
        return p + q if self.transition == "shift" else p @ q if self.transition == "matrix" else p * q

    def inject(self, u):
        """(..., H) real inputs -> (..., *state) increments Bbar u."""
        if self.mimo:
            return u.to(self.Bbar.dtype) @ self.Bbar.transpose(0, 1)
        return self.Bbar * u.unsqueeze(-1)

    def read(self, x):
        """(..., *state) -> (..., H) outputs C x (2 Re C x for conjugate pairs)."""
        y = x @ self.C.transpose(0, 1) if self.mimo else (self.C * x).sum(-1)
        return 2 * y.real if self.complex else y

    def impulse(self):
        """inject() of the unit input of every channel: (H, *state) MIMO, (H, S) SISO."""
        h = self.C.shape[0]
        basis = torch.eye(h, dtype=self.C.real.dtype, device=self.C.device) if self.mimo else \
            torch.ones(h, dtype=self.C.real.dtype, device=self.C.device)
        return self.inject(basis)

    def kernel(self, G):
        """Convolution kernel from the state impulse responses G[l] = a^l impulse():
        (H, L) SISO, (H_out, H_in, L) MIMO."""
        K = self.read(G)
        return K.permute(2, 1, 0) if self.mimo else K.transpose(0, 1)

    def drive(self, G, u):
        """sum_l G[l] u[:, l] (SISO): the state that inputs u (B, L, H) reach, G (L, H, S) pre-flipped."""
        return torch.einsum("lhs,blh->bhs", G, u.to(G.dtype))

    def unpack(self, x):
        return torch.complex(x[..., 0], x[..., 1]) if self.complex else x

    def pack(self, x):
        return torch.stack([x.real, x.imag], -1) if self.complex else x


def _complex(pairs):
    return torch.complex(pairs[..., 0], pairs[..., 1])


def _diag_system(p, disc):
    """S4D: H channels of N/2 complex modes, Bbar = disc(B = 1), C absorbs B."""
    A = torch.complex(-torch.exp(p["log_A_real"]), p["A_imag"])
    dA, dB = discretizer("diag", disc, "torch")(A, torch.ones_like(A), torch.exp(p["log_dt"])[:, None])
    return LinearSystem(dA, "diag", dB, _complex(p["C"]), complex=True)


def _dense_system(p, disc):
    """One dense A (N, N) for all channels, per-channel B_h, C_h, dt_h (Bbar_h = Bbar(I) B_h)."""
    n = p["A"].shape[0]
    eye = torch.eye(n, dtype=p["A"].dtype, device=p["A"].device)
    Abar, gain = discretizer("dense", disc, "torch")(p["A"], eye, torch.exp(p["log_dt"]))
    return LinearSystem(Abar, "matrix", torch.einsum("hnm,hm->hn", gain, p["B"]), p["C"])


def _s5_system(p, disc):
    """MIMO S5: one state of N/2 complex modes shared by the H channels."""
    lam = torch.complex(p["Lambda_re"], p["Lambda_im"])
    Lbar, gain = discretizer("diag", disc, "torch")(lam, torch.ones_like(lam), torch.exp(p["log_step"]))
    return LinearSystem(Lbar, "diag", gain[:, None] * _complex(p["B"]), _complex(p["C"]), mimo=True, complex=True)


def _shift_system(p, disc):
    """H3's shift SSM: the state is the last N inputs, newest first; K = C."""
    h, n = p["C"].shape
    e0 = torch.zeros(h, n, dtype=p["C"].dtype, device=p["C"].device)
    e0[:, 0] = 1
    return LinearSystem(1, "shift", e0, p["C"])


SYSTEMS = {"diag": _diag_system, "dense": _dense_system, "s5": _s5_system, "shift": _shift_system}


def powers(system: LinearSystem, v, n: int):
    """(n, *v.shape): a^k v for k = 0 .. n-1, by doubling (log n batched products)."""
    out, p = v.unsqueeze(0), system.a
    while out.shape[0] < n:
        out = torch.cat([out, system.apply(p, out)], 0)
        p = system.compose(p, p)
    return out[:n]


def _power(system: LinearSystem, k: int):
    """a^k (k >= 1) by binary exponentiation."""
    result, p = None, system.a
    while True:
        if k & 1:
            result = p if result is None else system.compose(result, p)
        k >>= 1
        if not k:
            return result
        p = system.compose(p, p)


def _recur(system: LinearSystem, p, b, x=None):
    """x_t = p x_{t-1} + b_t over axis 1 of b, one step at a time (x_{-1} = x, or 0).
    (unbind, not b[:, t]: indexing's backward would build a full-size gradient per step.)"""
    xs = []
    for b_t in b.unbind(1):
        x = b_t if x is None else system.apply(p, x) + b_t
        xs.append(x)
    return torch.stack(xs, 1)


def linear_scan(system: LinearSystem, b, chunk: int | None = None):
    """x_t = a x_{t-1} + b_t with x_{-1} = 0 over axis 1 of b (B, L, ...).

    Chunked: every chunk of `chunk` steps is scanned from zero at once, the
    chunk-end states are carried across chunks with a^chunk, and each chunk
    then adds a^(t+1) times the state it started from (about 3 sqrt(L)
    vectorised steps for chunk = sqrt(L), but three extra passes over the
    data).  By default small states (where per-step overhead dominates) use
    chunks of ceil(sqrt(L)) and large ones a plain loop over time.
    """
    batch, length, *state = b.shape
    if chunk is None:
        small = batch * math.prod(state) < SMALL_STATE
        chunk = max(1, math.isqrt(max(length - 1, 0)) + 1) if small else length
    size = max(1, chunk)
    count = -(-length // size)
    if count <= 1:
        return _recur(system, system.a, b)
    padded = torch.cat([b, b.new_zeros(batch, count * size - length, *state)], 1)
    local = _recur(system, system.a, padded.view(batch * count, size, *state)).view(batch, count, size, *state)
    ends = _recur(system, _power(system, size), local[:, :, -1])            # state after each chunk
    z = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], 1)      # state before each chunk
    carried = []
    for _ in range(size):
        z = system.apply(system.a, z)
        carried.append(z)
    x = local + torch.stack(carried, 2)
    return x.reshape(batch, count * size, *state)[:, :length]


def _blocked_powers(z, n: int):
    """(z^b for b < S, z^(S a) for a < A) with S ~ sqrt(n), A S >= n: every power z^l,
    l = S a + b, is a product of one of each, so sums over l become small matrix products."""
    size = max(1, math.isqrt(max(n - 1, 0)) + 1)
    count = -(-n // size)
    def pw(exponents):   # z^k as exp(k log z); a mode that underflowed to 0 gives 0^0 = 1, 0^k = 0
        k = exponents.to(z.real.dtype)
        zero = z == 0
        out = torch.exp(torch.log(torch.where(zero, torch.ones_like(z), z)).unsqueeze(-1) * k)
        return torch.where(zero.unsqueeze(-1), (k == 0).to(out.dtype), out)
    steps = torch.arange(max(size, count), device=z.device)
    return pw(steps[:size]), pw(size * steps[:count]), size, count


def diag_kernel(w, z, n: int):
    """K[..., l] = sum_k w[..., k] z[..., k]^l for l < n (a Vandermonde product), without
    materialising the (..., k, n) powers: (outer * w)^T @ inner over blocks of sqrt(n)."""
    inner, outer, size, count = _blocked_powers(z, n)
    K = torch.einsum("...ka,...kb->...ab", outer * w.unsqueeze(-1), inner)
    return K.reshape(*K.shape[:-2], size * count)[..., :n]


def diag_drive(z, u):
    """sum_s z^(L-1-s) u[:, s] for diagonal z (H, k) and u (B, L, H): (B, H, k), blocked like diag_kernel."""
    batch, n, h = u.shape
    inner, outer, size, count = _blocked_powers(z, n)
    v = u.flip(1).to(z.dtype)                                    # v[s'] = u[L-1-s']
    v = torch.cat([v, v.new_zeros(batch, size * count - n, h)], 1).view(batch, count, size, h)
    part = torch.einsum("bash,hks->bhak", v, inner)
    return torch.einsum("bhak,hka->bhk", part, outer)


def free_response(system: LinearSystem, x0, n: int):
    """(B, n, *state): a^(t+1) x0 for t = 0 .. n-1."""
    first = system.apply(system.a, x0).unsqueeze(1)
    return linear_scan(system, torch.cat([first, first.new_zeros((x0.shape[0], n - 1) + x0.shape[1:])], 1))


def causal_conv(u, K):
    """y[:, l] = sum_{s<=l} K[..., l-s] u[:, s] by an FFT of size 2L (real FFT for real data);
    u (B, L, H), K (H, L) per channel or (H_out, H_in, L) MIMO."""
    length, n = u.shape[1], 2 * u.shape[1]
    real = not (u.is_complex() or K.is_complex())
    fft = torch.fft.rfft if real else torch.fft.fft
    U, Kf = fft(u.transpose(1, 2), n=n), fft(K, n=n)
    Y = U * Kf if K.dim() == 2 else torch.einsum("oif,bif->bof", Kf, U)
    y = torch.fft.irfft(Y, n=n) if real else torch.fft.ifft(Y, n=n)
    return y[..., :length].transpose(1, 2)


class SSM(Recurrent):
    """Linear time-invariant SSM (kinds diag = S4D, dense, s5, shift) with two plans:
    ``"conv"`` (kernel + FFT convolution), ``"scan"`` (chunked scan, about 3 sqrt(L)
    vectorised steps) and ``"recurrent"`` (one step at a time)."""

    op = "ssm"

    def __init__(self, in_features, attrs):
        super().__init__(in_features, attrs)
        kind = self.attrs["kind"]
        if kind in ("diag", "s5") and self.attrs["d_state"] % 2:
            raise SeqcError(f"d_state must be even for kind={kind} (conjugate pairs), got {self.attrs['d_state']}")
        self.plan = self.attrs["plan"] if self.attrs["plan"] in ("conv", "recurrent") else "scan"

    def state_dtype(self, dtype):
        return _state_dtype(dtype)

    def system(self, dtype) -> LinearSystem:
        """The discretized system with parameters in `dtype`."""
        p = {name: t.to(dtype) for name, t in self.named_parameters(recurse=False)}
        return SYSTEMS[self.attrs["kind"]](p, self.attrs["disc"])

    def kernel(self, length: int):
        """The convolution kernel of `length` taps: (H, L), or (H, H, L) for s5."""
        system = self.system(work_dtype(self.D))
        if system.transition == "diag" and not system.mimo:
            K = diag_kernel(system.C * system.Bbar, system.a, length)
            return 2 * K.real if system.complex else K
        return system.kernel(powers(system, system.impulse(), length))

    def forward(self, u, state=None, return_state=False, lengths=None):
        lengths = check_lengths(lengths, u)
        work = work_dtype(u, self.D)
        with _no_autocast(u):
            system = self.system(work)
            uw = u.to(work)
            x0 = None if state is None else system.unpack(state["x"].to(work))
            run = {"conv": self._conv, "recurrent": self._recurrent}.get(self.plan, self._scan)
            y, x = run(system, uw, x0, lengths, return_state)
            y = (y + self.D.to(work) * uw).to(_out_dtype(u.dtype, work))
        return (y, {"x": system.pack(x)}) if return_state else y

    @staticmethod
    def _scan(system, u, x0, lengths, want_state):
        b = system.inject(u)
        if x0 is None:
            x0 = torch.zeros_like(b[:, 0])
        x = linear_scan(system, torch.cat([x0.unsqueeze(1), b], 1))    # x[:, t] = state after t steps
        final = x[:, -1] if lengths is None else at_positions(x, lengths)
        return system.read(x[:, 1:]), final

    @staticmethod
    def _recurrent(system, u, x0, lengths, want_state):
        """The plain recurrence, one step at a time (what `step` does, over a sequence)."""
        b = system.inject(u)
        if x0 is None:
            x0 = torch.zeros_like(b[:, 0])
        x = torch.cat([x0.unsqueeze(1), _recur(system, system.a, b, x0)], 1)
        final = x[:, -1] if lengths is None else at_positions(x, lengths)
        return system.read(x[:, 1:]), final

    @staticmethod
    def _conv(system, u, x0, lengths, want_state):
        """Kernel plan: FFT convolution plus the free response of x0; final state in closed form."""
        length = u.shape[1]
        final = None
        if system.mimo:   # H x H kernels would cost H^2 L: convolve the P modes, then read out
            x = causal_conv(system.inject(u), powers(system, torch.ones_like(system.a), length).T)
            y = system.read(x)
            if want_state:
                final = x[:, -1] if lengths is None else at_positions(_from_zero(x), lengths)
        elif system.transition == "diag":  # S4D: K[l] = 2 Re sum_n C_n Bbar_n a_n^l, no (L, H, N) powers
            K = diag_kernel(system.C * system.Bbar, system.a, length)
            y = causal_conv(u, 2 * K.real if system.complex else K)
            if want_state:
                final = system.Bbar * diag_drive(system.a, u if lengths is None else right_align(u, lengths))
        else:
            G = powers(system, system.impulse(), length)            # G[l] = a^l Bbar
            y = causal_conv(u, system.kernel(G))
            if want_state:   # x_L = sum_s a^(L-1-s) Bbar u_s
                final = system.drive(G.flip(0), u if lengths is None else right_align(u, lengths))
        if x0 is not None:
            free = free_response(system, x0, length)
            y = y + system.read(free)
            if want_state:
                final = final + (free[:, -1] if lengths is None else
                                 at_positions(torch.cat([x0.unsqueeze(1), free], 1), lengths))
        return y, final

    def step(self, u_t, state=None):
        if state is None:
            state = self.init_state(u_t.shape[0], u_t.dtype, u_t.device)
        work = work_dtype(u_t, self.D)
        with _no_autocast(u_t):
            system = self.system(work)
            u = u_t.to(work)
            x = system.apply(system.a, system.unpack(state["x"].to(work))) + system.inject(u)
            y = system.read(x) + self.D.to(work) * u
        return y.to(_out_dtype(u_t.dtype, work)), {"x": system.pack(x)}


# -- selective ssm ------------------------------------------------------------------------------


class SelectiveSSM(Recurrent):
    """Mamba's selective scan (``scan.selective_scan``); plan "recurrent" loops over `step`."""

    op = "selective_ssm"

    def __init__(self, in_features, attrs):
        super().__init__(in_features, attrs)
        self.plan = self.attrs["plan"]

    def state_dtype(self, dtype):
        return _state_dtype(dtype)

    def _scan_args(self, work):
        return dict(A=-torch.exp(self.A_log.to(work)), D=self.D.to(work),
                    delta_bias=self.delta_bias.to(work) if self.attrs["delta_bias"] else None,
                    delta_softplus=self.attrs["delta_softplus"], disc=self.attrs["disc"])

    def forward(self, u, delta, B, C, z=None, state=None, return_state=False, lengths=None):
        lengths = check_lengths(lengths, u)
        work, out_dtype = work_dtype(u, self.D), u.dtype
        with _no_autocast(u):
            u, delta, B, C, z = (None if t is None else t.to(work) for t in (u, delta, B, C, z))
            args = self._scan_args(work)
            if lengths is not None:
                delta = self._mask_delta(delta, lengths, args)
            x0 = None if state is None else state["x"].to(work)
            if self.plan == "recurrent":
                y, x = self._loop(u, delta, B, C, z, x0, args)
            else:
                y, x = scan.selective_scan(u, delta, B=B, C=C, z=z, state=x0, return_state=True, **args)
        y = y.to(_out_dtype(out_dtype, work))
        return (y, {"x": x}) if return_state else y

    @staticmethod
    def _mask_delta(delta, lengths, args):
        """Apply bias and softplus here, then zero delta past each length (dA = 1, dB u = 0 there)."""
        if args["delta_bias"] is not None:
            delta = delta + args["delta_bias"]
        if args["delta_softplus"]:
            delta = F.softplus(delta)
        args.update(delta_bias=None, delta_softplus=False)
        keep = torch.arange(delta.shape[1], device=delta.device)[None, :] < lengths[:, None]
        return torch.where(keep[..., None], delta, torch.zeros((), dtype=delta.dtype, device=delta.device))

    @staticmethod
    def _loop(u, delta, B, C, z, x, args):
        ys, zs = [], [None] * u.shape[1] if z is None else z.unbind(1)
        for u_t, delta_t, B_t, C_t, z_t in zip(u.unbind(1), delta.unbind(1), B.unbind(1), C.unbind(1), zs):
            y, x = scan.selective_scan_step(u_t, delta_t, B_t=B_t, C_t=C_t, z_t=z_t, state=x, **args)
            ys.append(y)
        if x is None:
            x = u.new_zeros(u.shape[0], u.shape[2], args["A"].shape[-1])
        return torch.stack(ys, 1), x

    def step(self, u_t, delta_t, B_t, C_t, z_t=None, state=None):
        work = work_dtype(u_t, self.D)
        with _no_autocast(u_t):
            u, delta, B, C, z = (None if t is None else t.to(work) for t in (u_t, delta_t, B_t, C_t, z_t))
            x = None if state is None else state["x"].to(work)
            y, x = scan.selective_scan_step(u, delta, B_t=B, C_t=C, z_t=z, state=x, **self._scan_args(work))
        return y.to(_out_dtype(u_t.dtype, work)), {"x": x}


# -- lstm -------------------------------------------------------------------------------------


class LSTM(Recurrent):
    """torch.nn.LSTM(batch_first=True) on our own parameters, via the same fused kernel."""

    op = "lstm"

    def flat_weights(self) -> list:
        names = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if self.attrs["bias"] else ())
        return [getattr(self, f"{n}_l{k}") for k in range(self.attrs["layers"]) for n in names]

    def forward(self, x, state=None, return_state=False, lengths=None):
        lengths = check_lengths(lengths, x)
        if state is None:
            state = self.init_state(x.shape[0], x.dtype, x.device)
        hx = (state["h"].transpose(0, 1).to(x.dtype), state["c"].transpose(0, 1).to(x.dtype))
        common = (self.flat_weights(), self.attrs["bias"], self.attrs["layers"], 0.0, self.training, False)
        if lengths is None:
            y, h, c = torch.lstm(x, (hx[0].contiguous(), hx[1].contiguous()), *common, True)
        else:
            y, h, c = self._packed(x, hx, lengths, common)
        return (y, {"h": h.transpose(0, 1), "c": c.transpose(0, 1)}) if return_state else y

    @classmethod
    def _packed(cls, x, hx, lengths, common):
        """Packed sequences; rows of length 0 (packing refuses them) output zeros and keep their state."""
        live = lengths > 0
        if not bool(live.all()):
            rows = live.nonzero().squeeze(1)
            y = x.new_zeros(x.shape[:2] + (hx[0].shape[-1],))
            h, c = hx[0].clone(), hx[1].clone()
            if rows.numel():
                y_live, h_live, c_live = cls._packed(x[rows], (hx[0][:, rows], hx[1][:, rows]), lengths[rows], common)
                y, h, c = y.index_copy(0, rows, y_live), h.index_copy(1, rows, h_live), c.index_copy(1, rows, c_live)
            return y, h, c
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        order, back = packed.sorted_indices, packed.unsorted_indices
        hx = tuple(s.index_select(1, order).contiguous() for s in hx)
        data, h, c = torch.lstm(packed.data, packed.batch_sizes, hx, *common)
        y, _ = pad_packed_sequence(PackedSequence(data, packed.batch_sizes, order, back),
                                   batch_first=True, total_length=x.shape[1])
        return y, h.index_select(1, back), c.index_select(1, back)


# -- attention -----------------------------------------------------------------------------------


class Attention(Recurrent):
    """Causal multi-head attention equal to F.scaled_dot_product_attention(is_causal=True);
    the state is a KV cache that later chunks and steps attend over."""

    op = "attention"
    PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

    def _build(self, shapes):
        for name in self.PROJECTIONS:
            out_f, in_f = shapes[f"{name}.weight"]
            proj = nn.Linear(in_f, out_f, bias=f"{name}.bias" in shapes)
            nn.init.zeros_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
            self.add_module(name, proj)
        d, heads = self.in_features[0], self.attrs["heads"]
        if d % heads:
            raise SeqcError(f"{d} features do not divide into {heads} heads")
        self.heads, self.head_dim = heads, d // heads

    def init_state(self, batch, dtype=torch.float32, device=None):
        empty = torch.zeros(batch, self.heads, 0, self.head_dim, dtype=dtype, device=device)
        return {"k": empty, "v": empty.clone()}

    def _split(self, x):
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, state=None, return_state=False, lengths=None):
        lengths = check_lengths(lengths, x)
        batch, length, d = x.shape
        q, k, v = (self._split(getattr(self, p)(x)) for p in self.PROJECTIONS[:3])
        if state is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            past_valid = x.new_ones(batch, 0, dtype=torch.bool)
        else:
            k = torch.cat([state["k"].to(k.dtype), k], 2)
            v = torch.cat([state["v"].to(v.dtype), v], 2)
            past = state["k"].shape[2]
            past_valid = state.get("valid", x.new_ones(batch, past, dtype=torch.bool))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(past_valid, length))
        y = self.o_proj(out.transpose(1, 2).reshape(batch, length, d))
        if not return_state:
            return y
        new_state = {"k": k, "v": v}
        if lengths is not None or (state is not None and "valid" in state):
            now = torch.arange(length, device=x.device)[None, :] < (length if lengths is None else lengths[:, None])
            new_state["valid"] = torch.cat([past_valid, now.expand(batch, length)], 1)
        return y, new_state

    @staticmethod
    def _mask(past_valid, length):
        """(B, 1, L, P+L) bool: the valid cached keys plus the causal part over the new ones."""
        batch, past = past_valid.shape
        device = past_valid.device
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        cached = past_valid[:, None, None, :].expand(batch, 1, length, past)
        return torch.cat([cached, causal.expand(batch, 1, length, length)], -1)


LAYERS = {cls.op: cls for cls in (Linear, Conv1d, LayerNorm, RMSNorm, Embedding, SSM, SelectiveSSM, LSTM, Attention)}

__all__ = ["LAYERS", "Layer", "Pointwise", "Recurrent", "Linear", "Conv1d", "LayerNorm", "RMSNorm",
           "Embedding", "SSM", "SelectiveSSM", "LSTM", "Attention", "LinearSystem", "SYSTEMS", "powers",
           "linear_scan", "free_response", "causal_conv", "with_defaults", "check_lengths"]
