"""The one table of ops: inputs, keyword attributes (types, defaults, ranges),
output-shape rules, weights and recurrent state.  Semantic analysis, the IR
verifier, the initialisers and every backend read this table; nothing else
declares what an op is.

Shapes here are tuples whose entries are ints or sympy expressions (the
symbolic batch / length dimensions).  Weight and state shapes are concrete.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from .errors import SeqcError

REQUIRED = object()


class ShapeError(SeqcError):
    """Raised by a shape rule (a user's mistake; the elaborator adds the location);
    `arg` is the index of the offending input (or None)."""

    def __init__(self, message: str, arg: int | None = None):
        super().__init__(message)
        self.arg = arg


@dataclass(frozen=True)
class Attr:
    name: str
    type: str                    # int | float | bool | enum | sizes | str
    default: Any = REQUIRED
    choices: tuple[str, ...] = ()
    min: float | None = None     # inclusive lower bound
    max: float | None = None     # inclusive upper bound
    positive: bool = False       # strictly > 0
    doc: str = ""
    init_only: bool = False      # read by the initialisers only; backends never see it


@dataclass(frozen=True)
class OpSpec:
    name: str
    inputs: tuple[str, ...]                    # tensor inputs, in order
    attrs: tuple[Attr, ...] = ()
    optional_inputs: tuple[str, ...] = ()      # trailing inputs that may be omitted
    variadic: bool = False                     # concat: any number of inputs
    shape: Callable = None                     # (in_shapes, attrs) -> list of out shapes
    weights: Callable = None                   # (in_shapes, attrs) -> {name: shape}
    state: Callable = None                     # (in_shapes, attrs) -> {name: shape without batch}
    kind: str = "layer"                        # layer | elementwise | structural | activation
    time_invariant: bool = False               # a convolution face exists
    int_input: bool = False                    # first input holds integer tokens
    doc: str = ""

    @property
    def defaults(self) -> dict:
        """Every attribute that has a default, with it."""
        return {a.name: a.default for a in self.attrs if a.default is not REQUIRED}

    def attr(self, name: str) -> Attr | None:
        return next((a for a in self.attrs if a.name == name), None)

    def runtime_attrs(self, attrs: dict) -> dict:
        """The attributes a backend needs (initialisation-only ones dropped)."""
        return {k: v for k, v in attrs.items() if not (self.attr(k) and self.attr(k).init_only)}

    @property
    def has_weights(self) -> bool:
        return self.weights is not None

    @property
    def stateful(self) -> bool:
        return self.state is not None


OPS: dict[str, OpSpec] = {}


def op(spec: OpSpec) -> OpSpec:
    OPS[spec.name] = spec
    return spec


# -- shape helpers -------------------------------------------------------------

def _last(shape):
    return shape[-1]


def _need_rank(shape, rank, arg=0, what="input"):
    if len(shape) != rank:
        raise ShapeError(f"{what} must have {rank} dimensions, got {len(shape)}", arg)


def _seq(shapes, attrs):
    _need_rank(shapes[0], 3, 0, "input (batch, length, features)")
    return [tuple(shapes[0])]


def _same_as_first(shapes, attrs):
    return [tuple(shapes[0])]


def _eq_dim(a, b, i, j, what, arg):
    import sympy
    if sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) != 0:
        raise ShapeError(f"{what}: dimension {i} is {a} but expected {b}", arg)


def _check_same(shapes, attrs):
    a = shapes[0]
    for k, s in enumerate(shapes[1:], 1):
        if len(s) != len(a):
            raise ShapeError(f"operands have {len(a)} and {len(s)} dimensions", k)
        for i, (x, y) in enumerate(zip(s, a)):
            _eq_dim(x, y, i, i, f"operand {k + 1} does not match operand 1", k)
    return [tuple(a)]


_DT_ATTRS = (Attr("dt_min", "float", 1e-3, positive=True, init_only=True),
             Attr("dt_max", "float", 1e-1, positive=True, init_only=True),
             Attr("dt_init_floor", "float", 1e-4, positive=True, init_only=True))
_ACTIVATIONS = ("identity", "silu", "gelu", "relu", "softplus", "sigmoid", "tanh")
_PLANS = ("auto", "conv", "scan", "recurrent")
_DISC = ("zoh", "bilinear", "euler", "backward_euler", "mamba")

# -- structural and elementwise ------------------------------------------------

def _linear_shape(s, a):
    return [tuple(s[0][:-1]) + (a["out"],)]


op(OpSpec("linear", ("x",), (
    Attr("out", "int", positive=True, doc="output features"),
    Attr("bias", "bool", True),
    Attr("init", "enum", "default", ("default", "mamba_dt", "zeros"), init_only=True,
         doc="default: torch.nn.Linear; mamba_dt: Mamba's dt_proj (weight ±dt_rank^-0.5, bias inverse-softplus dt)"),
    *_DT_ATTRS,
), shape=_linear_shape,
   weights=lambda s, a: {"weight": (a["out"], int(_last(s[0]))), **({"bias": (a["out"],)} if a["bias"] else {})},
   doc="y = x W^T + b over the last dimension"))


def _conv_weights(s, a):
    d = int(_last(s[0]))
    return {"weight": (d, 1, a["kernel"]), **({"bias": (d,)} if a["bias"] else {})}


op(OpSpec("conv1d", ("x",), (
    Attr("kernel", "int", 4, positive=True, max=4096),
    Attr("bias", "bool", True),
    Attr("activation", "enum", "identity", _ACTIVATIONS),
), shape=_seq, weights=_conv_weights,
   state=lambda s, a: {"window": (int(_last(s[0])), a["kernel"] - 1)},
   time_invariant=True, doc="causal depthwise convolution over time (torch Conv1d groups=channels layout)"))

op(OpSpec("layernorm", ("x",), (Attr("eps", "float", 1e-5, positive=True), Attr("bias", "bool", True)),
          shape=_same_as_first, kind="structural",
          weights=lambda s, a: {"weight": (int(_last(s[0])),), **({"bias": (int(_last(s[0])),)} if a["bias"] else {})}))
op(OpSpec("rmsnorm", ("x",), (Attr("eps", "float", 1e-5, positive=True),), shape=_same_as_first,
          kind="structural", weights=lambda s, a: {"weight": (int(_last(s[0])),)}))

for _act in _ACTIVATIONS[1:]:
    op(OpSpec(_act, ("x",), shape=_same_as_first, kind="activation", doc=f"elementwise {_act}"))

op(OpSpec("dropout", ("x",), (Attr("p", "float", 0.0, min=0.0, max=0.999),), shape=_same_as_first,
          kind="activation", doc="identity at inference and in the reference backend"))

for _bin in ("add", "sub", "mul"):
    op(OpSpec(_bin, ("a", "b"), shape=_check_same, kind="elementwise"))

op(OpSpec("embedding", ("tokens",), (Attr("vocab", "int", positive=True), Attr("dim", "int", positive=True)),
          shape=lambda s, a: (_need_rank(s[0], 2, 0, "tokens (batch, length)"), [tuple(s[0]) + (a["dim"],)])[1],
          weights=lambda s, a: {"weight": (a["vocab"], a["dim"])}, int_input=True, kind="structural"))


def split_sizes(features: int, sizes) -> list[int]:
    """`sizes` (a number of equal parts or a list of sizes) as a list adding up to `features`;
    shared by the shape rule and every backend's split."""
    features = int(features)
    if isinstance(sizes, int):
        if sizes <= 0 or features % sizes:
            raise ShapeError(f"cannot split {features} features into {sizes} equal parts", 0)
        sizes = [features // sizes] * sizes
    sizes = [int(k) for k in sizes]
    if sum(sizes) != features:
        raise ShapeError(f"split sizes {sizes} add up to {sum(sizes)}, but the input has {features} features", 0)
    return sizes


def _split_shape(s, a):
    return [tuple(s[0][:-1]) + (k,) for k in split_sizes(_last(s[0]), a["sizes"])]


op(OpSpec("split", ("x",), (Attr("sizes", "sizes", doc="a number of equal parts or a list of sizes"),),
          shape=_split_shape, kind="structural", doc="split the last dimension"))


def _concat_shape(s, a):
    base = s[0]
    for k, t in enumerate(s[1:], 1):
        if len(t) != len(base):
            raise ShapeError(f"operands have {len(base)} and {len(t)} dimensions", k)
        for i in range(len(base) - 1):
            _eq_dim(t[i], base[i], i, i, f"operand {k + 1} does not match operand 1", k)
    return [tuple(base[:-1]) + (sum(int(t[-1]) for t in s),)]


op(OpSpec("concat", ("x",), shape=_concat_shape, variadic=True, kind="structural",
          doc="concatenate along the last dimension"))

op(OpSpec("gate", ("x", "g"), (Attr("act", "enum", "silu", _ACTIVATIONS),), shape=_check_same,
          kind="elementwise", doc="x * act(g)"))


def _glu_shape(s, a):
    d = int(_last(s[0]))
    if d % 2:
        raise ShapeError(f"glu needs an even number of features, got {d}", 0)
    return [tuple(s[0][:-1]) + (d // 2,)]


op(OpSpec("glu", ("x",), (Attr("act", "enum", "sigmoid", _ACTIVATIONS),), shape=_glu_shape,
          kind="elementwise", doc="a * act(b) where a, b = halves of the last dimension"))

# -- sequence layers ------------------------------------------------------------

_SSM_INITS = ("s4d-lin", "s4d-inv", "s4d-real", "hippo-legs")


def _ssm_weights(s, a):
    h = int(_last(s[0]))
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


def _ssm_state(s, a):
    h, n, kind = int(_last(s[0])), a["d_state"], a["kind"]
    if kind == "diag":
        return {"x": (h, n // 2, 2)}       # complex modes as (re, im)
    if kind == "s5":
        return {"x": (n // 2, 2)}
    return {"x": (h, n)}


def _ssm_shape(s, a):
    out = _seq(s, a)
    if a["kind"] in ("diag", "s5") and a["d_state"] % 2:
        raise ShapeError(f"d_state must be even for kind={a['kind']} (conjugate pairs), got {a['d_state']}")
    if a["kind"] == "dense" and a["init"] not in ("hippo-legs", "s4d-real"):
        raise ShapeError(f"init={a['init']} needs kind=diag; a dense A takes hippo-legs or s4d-real")
    return out


op(OpSpec("ssm", ("u",), (
    Attr("d_state", "int", 64, positive=True, max=4096),
    Attr("kind", "enum", "diag", ("diag", "dense", "s5", "shift"),
         doc="diag: S4D; dense: shared dense A (small N); s5: MIMO S5; shift: H3's shift SSM"),
    Attr("init", "enum", "s4d-lin", _SSM_INITS, init_only=True),
    Attr("disc", "enum", "zoh", ("zoh", "bilinear", "euler", "backward_euler")),
    Attr("plan", "enum", "auto", _PLANS),
    *_DT_ATTRS[:2],
), shape=_ssm_shape, weights=_ssm_weights, state=_ssm_state, time_invariant=True,
   doc="linear time-invariant state-space layer (S4D by default)"))


def _sel_shape(s, a):
    u, delta, b, c = s[:4]
    for k, t in enumerate(s):
        _need_rank(t, 3, k, "every input (batch, length, features)")
    for k, t in ((1, delta),) + (((4, s[4]),) if len(s) > 4 else ()):
        for i in range(3):
            _eq_dim(t[i], u[i], i, i, f"{('u', 'delta', 'B', 'C', 'z')[k]} does not match u", k)
    for k, t in ((2, b), (3, c)):
        for i in range(2):
            _eq_dim(t[i], u[i], i, i, f"{'BC'[k - 2]} does not match u", k)
        _eq_dim(t[2], a["d_state"], 2, 2, f"{'BC'[k - 2]} must have d_state features", k)
    return [tuple(u)]


def _sel_weights(s, a):
    d, n = int(_last(s[0])), a["d_state"]
    w = {"A_log": (d, n), "D": (d,)}
    if a["delta_bias"]:
        w["delta_bias"] = (d,)
    return w


op(OpSpec("selective_ssm", ("u", "delta", "B", "C", "z"), (
    Attr("d_state", "int", 16, positive=True, max=4096),
    Attr("delta_bias", "bool", False, doc="add a learned bias (Mamba's dt initialisation) before softplus"),
    Attr("delta_softplus", "bool", True),
    Attr("disc", "enum", "mamba", ("mamba", "zoh", "bilinear")),
    Attr("plan", "enum", "auto", _PLANS),
    *_DT_ATTRS,
), optional_inputs=("z",), shape=_sel_shape, weights=_sel_weights,
   state=lambda s, a: {"x": (int(_last(s[0])), a["d_state"])},
   doc="Mamba's selective scan with optional silu(z) gate"))


def _lstm_weights(s, a):
    d, h = int(_last(s[0])), a["hidden"]
    w = {}
    for k in range(a["layers"]):
        w[f"weight_ih_l{k}"] = (4 * h, d if k == 0 else h)
        w[f"weight_hh_l{k}"] = (4 * h, h)
        if a["bias"]:
            w[f"bias_ih_l{k}"] = (4 * h,)
            w[f"bias_hh_l{k}"] = (4 * h,)
    return w


op(OpSpec("lstm", ("x",), (
    Attr("hidden", "int", positive=True), Attr("layers", "int", 1, positive=True, max=64), Attr("bias", "bool", True),
    Attr("plan", "enum", "auto", ("auto", "recurrent")),
), shape=lambda s, a: [tuple(_seq(s, a)[0][:-1]) + (a["hidden"],)], weights=_lstm_weights,
   state=lambda s, a: {"h": (a["layers"], a["hidden"]), "c": (a["layers"], a["hidden"])},
   doc="torch.nn.LSTM(batch_first=True) semantics, gate order i, f, g, o"))


def _attn_shape(s, a):
    out = _seq(s, a)
    d = int(_last(s[0]))
    if d % a["heads"]:
        raise ShapeError(f"{d} features do not divide into {a['heads']} heads", 0)
    return out


def _attn_weights(s, a):
    d = int(_last(s[0]))
    w = {}
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        w[f"{p}.weight"] = (d, d)
        if a["bias"]:
            w[f"{p}.bias"] = (d,)
    return w


op(OpSpec("attention", ("x",), (
    Attr("heads", "int", positive=True, max=4096), Attr("bias", "bool", False),
    Attr("plan", "enum", "auto", ("auto", "recurrent")),
), shape=_attn_shape, weights=_attn_weights,
   state=lambda s, a: {k: (a["heads"], 0, int(_last(s[0])) // a["heads"]) for k in ("k", "v")},  # KV cache, grows
   doc="causal multi-head scaled dot-product attention with q/k/v/o projections"))




def lookup(name: str) -> OpSpec | None:
    return OPS.get(name)


PARAM_FUNCTIONS: dict[str, Callable] = {
    "ceil": lambda x: math.ceil(x), "floor": lambda x: math.floor(x),
    "min": min, "max": max, "int": lambda x: int(x), "round": lambda x: int(round(x)),
}
