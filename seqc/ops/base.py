"""What an op is: ``Attr`` (a keyword attribute), ``OpSpec`` (inputs, attributes,
shape / weight / state rules, NumPy reference, initialiser, plan options, fusion
traits), ``Traits``, ``PlanOption`` (one execution plan with its predicted cost),
``ShapeError``, the ``OPS`` table with ``register_op``, and the helpers the op
family modules share (shape rules, reference-oracle plumbing).

Shapes are tuples whose entries are ints or sympy expressions (the symbolic
batch / length dimensions).  Weight and state shapes are concrete.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import SeqcError

REQUIRED = object()


class ShapeError(SeqcError):
    """Raised by a shape rule or an attribute check (a user's mistake; the elaborator
    adds the location); `arg` is the index of the offending input, `attr` the name (or
    names, most likely culprit first) of the offending attribute(s), or None."""

    def __init__(self, message: str, arg: int | None = None, attr: str | tuple[str, ...] | None = None):
        super().__init__(message)
        self.arg = arg
        self.attr = attr


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
class Traits:
    """What the passes may assume about an op (they ask these, never op names).

    * ``activation``: a unary elementwise activation; folds into an op with
      ``accepts_activation`` (conv1d's ``activation`` attribute).
    * ``accepts_activation``: the op ends with its ``activation`` attribute.
    * ``accepts_gate``: the op takes an optional last input ``z`` and multiplies
      its output by silu(z) (selective_ssm).
    * ``anchor``: the op can anchor a fusion region (a scan or convolution);
      ``fused(node)`` lists the work such a region performs.
    * ``epilogue_ok``: an elementwise op that can join a region after an anchor.
    * ``discretization(node)``: ``(structure, method)`` of a continuous-time op
      for the discretize pass, or None.
    * ``identity(node)``: the input Ref a node merely forwards, or None.
    * ``time_invariant``: a convolution face exists.
    """
    activation: bool = False
    accepts_activation: bool = False
    accepts_gate: bool = False
    anchor: bool = False
    fused: Callable | None = None
    epilogue_ok: bool = False
    discretization: Callable | None = None
    identity: Callable | None = None
    time_invariant: bool = False


# forward+backward / forward, per sequential step (fitted with benchmarks/bench_plans.py --train)
TRAIN_LOOP_STEPS = 6.0
TRAIN_BATCHED_STEPS = 2.5


@dataclass
class PlanOption:
    """One execution plan of a layer and the cost model's inputs for it:
    ``time = steps * machine["step"] + elements * ns_per_element * 1e-9``."""
    plan: str
    steps: float
    elements: float
    ns_per_element: float
    flops: float
    working_set: float      # bytes materialised
    legal: bool = True
    why: str = ""
    batched: bool = False      # its steps are a fixed set of batched ops, not a loop over time
    training: bool = False
    train_steps: float | None = None      # forward+backward / forward, measured for this plan (else the defaults)
    train_elements: float | None = None

    def seconds(self, m) -> float:
        steps, elements = self.steps, self.elements
        if self.training:   # backward: autograd replays every step (a loop's far more dearly)
            steps *= self.train_steps or (TRAIN_BATCHED_STEPS if self.batched else TRAIN_LOOP_STEPS)
            elements *= self.train_elements or 2
        return steps * m["step"] + elements * self.ns_per_element * 1e-9


@dataclass(frozen=True)
class OpSpec:
    """Everything about one op.  The callables:

    * ``shape(in_shapes, attrs) -> [out shapes]``; ``weights(in_shapes, attrs) ->
      {name: shape}``; ``state(in_shapes, attrs) -> {name: shape without batch}``.
    * ``reference(*inputs, p, **attrs)``: the NumPy oracle in float64; stateful ops
      take ``state=None, plan=None`` (and may take ``discretize=None``) and return
      ``(y, final_state)``.  ``reference_step(*inputs_t, p, state, **attrs) ->
      (y_t, new_state)`` defaults to the reference on a length-1 sequence;
      ``reference_init_state(batch, p, **attrs)`` gives the zero state.
    * ``init(shapes, attrs, rng) -> {name: array}``: the seeded initialiser.
    * ``plan_options(node, ctx, machine) -> [PlanOption]``: the execution plans the
      planner chooses between (ops without it are not planned); a function of the node's
      op, attributes and input shapes only (repeated layers are decided once).
    * ``validate(attrs)``: cross-attribute checks, raising ShapeError.
    """
    name: str
    inputs: tuple[str, ...]                    # tensor inputs, in order
    attrs: tuple[Attr, ...] = ()
    optional_inputs: tuple[str, ...] = ()      # trailing inputs that may be omitted
    variadic: bool = False                     # concat: any number of inputs
    shape: Callable = None
    weights: Callable = None
    state: Callable = None
    kind: str = "layer"                        # layer | elementwise | structural | activation
    time_invariant: bool = False               # a convolution face exists
    int_input: bool = False                    # first input holds integer tokens
    doc: str = ""
    reference: Callable | None = None
    reference_step: Callable | None = None
    reference_init_state: Callable | None = None
    init: Callable | None = None
    plan_options: Callable | None = None
    traits: Traits = field(default_factory=Traits)
    validate: Callable | None = None

    def __post_init__(self):
        if self.reference is not None and self.state is not None and self.reference_step is None:
            object.__setattr__(self, "reference_step", step_of(self.reference))

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
    def runtime_defaults(self) -> dict:
        """The defaults of the attributes a backend sees (initialisation-only ones left out)."""
        return {a.name: a.default for a in self.attrs if a.default is not REQUIRED and not a.init_only}

    def shown_attrs(self, in_shapes, attrs: dict) -> dict:
        """The attributes a layer's repr shows, in table order, like torch.nn's reprs:
        the required ones and the int / bool ones that define shapes (another value
        changes the weight or state shapes: ``d_state``, ``bias``) always, every other
        one (``eps``, ``direction``) only where it differs from its default.
        Initialisation-only attributes (``init``, ``dt_min``, ...) never: the layer does
        not have them, they only drew its initial weights."""
        shown = {}
        for a in self.attrs:
            if a.init_only or a.name not in attrs:
                continue
            value = attrs[a.name]
            if a.default is REQUIRED or value != a.default \
                    or (a.type in ("int", "bool") and self._shape_defining(a, in_shapes, attrs)):
                shown[a.name] = value
        return shown

    def _shape_defining(self, a: Attr, in_shapes, attrs: dict) -> bool:
        """Whether another value of `a` changes the weight or state shapes (a rule that
        rejects the other value constrains the shapes too)."""
        value = attrs[a.name]
        if a.type == "bool":
            other = not value
        elif a.type == "int" and isinstance(value, int):
            other = 2 * value if value > 0 else 1       # not value + 1: N // 2 pairs hide it
            if a.max is not None and other > a.max:
                other = value // 2
        else:
            return False
        rules = [r for r in (self.weights, self.state) if r is not None]
        try:
            before = [r(in_shapes, attrs) for r in rules]
        except Exception:
            return False
        try:
            return [r(in_shapes, {**attrs, a.name: other}) for r in rules] != before
        except Exception:
            return True

    @property
    def has_weights(self) -> bool:
        return self.weights is not None

    @property
    def stateful(self) -> bool:
        return self.state is not None

    @property
    def is_layer(self) -> bool:
        """A layer owns weights or state: it becomes a module of a backend."""
        return self.has_weights or self.stateful


OPS: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    """Add `spec` to the table of ops (replacing one of the same name) and return it."""
    if not isinstance(spec, OpSpec):
        raise SeqcError(f"register_op needs an OpSpec, got {type(spec).__name__}")
    if not spec.name.isidentifier() or spec.name.startswith("_"):
        raise SeqcError(f"op name {spec.name!r} must be a Python identifier not starting with '_'")
    if spec.shape is None:
        raise SeqcError(f"op {spec.name!r} needs a shape rule")
    OPS[spec.name] = spec
    return spec


def lookup(name: str) -> OpSpec | None:
    return OPS.get(name)


# -- shape helpers -------------------------------------------------------------

def last(shape):
    return shape[-1]


def need_rank(shape, rank, arg=0, what="input"):
    if len(shape) != rank:
        raise ShapeError(f"{what} must have {rank} dimensions, got {len(shape)}", arg)


def seq_shape(shapes, attrs):
    """One (batch, length, features) input, output of the same shape."""
    need_rank(shapes[0], 3, 0, "input (batch, length, features)")
    return [tuple(shapes[0])]


def same_as_first(shapes, attrs):
    return [tuple(shapes[0])]


def eq_dim(a, b, i, j, what, arg):
    if a == b:                      # structurally equal (ints, or the same symbolic expression): no sympy
        return
    import sympy
    if sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) != 0:
        raise ShapeError(f"{what}: dimension {i} is {a} but expected {b}", arg)


def check_same(shapes, attrs):
    a = shapes[0]
    for k, s in enumerate(shapes[1:], 1):
        if len(s) != len(a):
            raise ShapeError(f"operands have {len(a)} and {len(s)} dimensions", k)
        for i, (x, y) in enumerate(zip(s, a)):
            eq_dim(x, y, i, i, f"operand {k + 1} does not match operand 1", k)
    return [tuple(a)]


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


# attributes several families share
DT_ATTRS = (Attr("dt_min", "float", 1e-3, positive=True, init_only=True),
            Attr("dt_max", "float", 1e-1, positive=True, init_only=True),
            Attr("dt_init_floor", "float", 1e-4, positive=True, init_only=True))
ACTIVATION_NAMES = ("identity", "silu", "gelu", "relu", "softplus", "sigmoid", "tanh", "gelu_tanh")
PLANS = ("auto", "conv", "scan", "recurrent")


def check_dt_range(attrs: dict) -> None:
    """dt_min <= dt_max (the initialisers draw dt between them)."""
    lo, hi = attrs.get("dt_min"), attrs.get("dt_max")
    if lo is not None and hi is not None and lo > hi:
        raise ShapeError(f"dt_min ({lo:g}) must not exceed dt_max ({hi:g})", attr=("dt_max", "dt_min"))


def itemsize(ctx) -> int:
    """Bytes per element of the planning context's dtype."""
    return {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}.get(ctx.dtype, 4)


# -- reference-oracle plumbing -------------------------------------------------------


def f64(x):
    return np.asarray(x, dtype=np.float64)


def with_defaults(op_name: str):
    """Decorator: fill attributes the caller left out with the op's defaults (looked up
    at call time, so the function may be defined before its spec)."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            return fn(*args, **{**OPS[op_name].defaults, **kwargs})
        return call
    return wrap


def step_of(sequence_fn):
    """The one-step form of a sequence op: run it on a length-1 sequence."""
    @functools.wraps(sequence_fn)
    def step(*inputs_t, p, state, **attrs):
        attrs.pop("plan", None)
        seq = [None if a is None else np.asarray(a)[:, None] for a in inputs_t]
        y, new_state = sequence_fn(*seq, p=p, state=state, **attrs)
        return y[:, 0], new_state
    step.__name__ = step.__qualname__ = getattr(sequence_fn, "__name__", "op") + "_step"
    step.__doc__ = f"One time step of ``{step.__name__[:-5]}``: inputs (B, .) -> (y_t, new_state)."
    return step


def zero_state(op_name: str, batch: int, features: int, attrs: dict) -> dict:
    """Zeros in the op's state layout for an input with `features` features."""
    shapes = OPS[op_name].state(((batch, 1, features),), attrs)
    return {k: np.zeros((batch,) + tuple(int(d) for d in s)) for k, s in shapes.items()}


def uniform(rng, bound, shape):
    return rng.uniform(-bound, bound, size=shape)


def log_uniform_log(rng, lo, hi, size):
    """log of a log-uniform draw in [lo, hi]: U[log lo, log hi]."""
    return rng.uniform(math.log(lo), math.log(hi), size=size)
