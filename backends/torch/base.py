"""Shared pieces of the torch runtime: the registries ``LAYERS`` (op name ->
``Layer`` subclass; every subclass that sets ``op = "name"`` registers itself)
and ``FUNCTIONS`` (op name -> torch function for a stateless op, filled by
``@torch_function("name")``), attribute defaults, working and state dtypes,
length handling, and the base classes (``Layer``, ``Pointwise`` for
per-position layers, ``Recurrent`` for layers with a state)."""
from __future__ import annotations

import contextlib
import functools
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from seqc.discretization import discretizer
from seqc.errors import SeqcError
from seqc.registry import OPS

HALF = (torch.float16, torch.bfloat16)

LAYERS: dict[str, type] = {}        # op name -> Layer subclass (registered by Layer.__init_subclass__)
FUNCTIONS: dict[str, object] = {}   # op name -> torch function of a stateless op


def torch_function(name: str):
    """Decorator: register `fn` as the torch implementation of the stateless op `name`
    (called as ``fn(*inputs, **attrs)``; attributes it does not use must be accepted)."""
    def register(fn):
        FUNCTIONS[name] = fn
        return fn
    return register

# -- helpers ---------------------------------------------------------------------------


def compiler_disable(fn):
    """``torch.compiler.disable(fn)``, applied on the first call instead of at import.

    ``torch.compiler.disable`` imports ``torch._dynamo`` (seconds of a cold start that
    never uses ``torch.compile``).  Until something has imported dynamo no
    ``torch.compile`` can be tracing, so the wrapper calls ``fn`` directly; from then on
    it calls the disabled function, built once.  Where dynamo is already imported when
    the wrapper is made, or when any wrapper is called eagerly, every wrapper's disabled
    function is built then: built while dynamo traces, it would cost extra graph breaks."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        disabled = call.__dict__.get("_seqc_disabled")
        if disabled is None:
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)
            _build_disabled()
            disabled = call._seqc_disabled
        return disabled(*args, **kwargs)
    call._seqc_fn = fn
    _DISABLE_WRAPPERS.append(call)
    if "torch._dynamo" in sys.modules:
        _build_disabled()
    return call


_DISABLE_WRAPPERS: list = []


def _build_disabled() -> None:
    for wrapper in _DISABLE_WRAPPERS:
        if "_seqc_disabled" not in wrapper.__dict__:
            wrapper._seqc_disabled = torch.compiler.disable(wrapper._seqc_fn)
    if EAGER.run is _run_eagerly:
        EAGER.run = torch.compiler.disable(_run_eagerly)


def _run_eagerly(fn, *args, **kwargs):
    return fn(*args, **kwargs)


# ``EAGER.run(fn, *args, **kwargs)``: fn(*args, **kwargs); once torch._dynamo is loaded, the same
# through ``torch.compiler.disable``, so a trace of the generated forward breaks at that call
# itself: one split of the forward and no frames below it (a break inside a layer splits every
# frame on the way down, each a graph of its own with its guards).  The generated code calls
# through it the layers whose work is one kernel torch.compile cannot trace (``Layer.eager_under_compile``).
EAGER = SimpleNamespace(run=_run_eagerly)



def with_defaults(op: str, attrs: dict) -> dict:
    """The node's runtime attributes completed with the registry's defaults.
    Initialisation-only attributes (``init``, ``dt_min``, ...) are not filled in: the
    compiler drops them before the backend, so a default here would be invented."""
    spec = OPS[op]
    out = {**spec.runtime_defaults, **spec.runtime_attrs(attrs)}
    missing = [a.name for a in spec.attrs if a.name not in out and not a.init_only]
    if missing:
        raise SeqcError(f"{op}: missing attribute {', '.join(missing)}")
    return out


def stand_in_shapes(in_features) -> list[tuple]:
    """Stand-in input shapes (1, 1, features) for the registry's weight / state rules."""
    return [(1, 1, int(f)) for f in in_features]


def work_dtype(*tensors) -> torch.dtype:
    """The promoted float dtype of `tensors`, with half precision raised to float32."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype in HALF or not dtype.is_floating_point else dtype


def output_dtype(dtype, work):
    """Outputs keep a half-precision input's dtype, otherwise the compute dtype."""
    return dtype if dtype in HALF else work


def accumulator_dtype(dtype) -> torch.dtype:
    """State precision: float64 stays, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_autocast(x):
    """A context with autocast off for x's device (a no-op context when it is off already:
    decoding enters this per layer and token)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, enabled=False)


@compiler_disable
def outside_compile(fn, *args):
    """``fn(*args)`` run eagerly even inside torch.compile: an intended graph break, one per
    call, for the fused recurrent kernels (``torch.lstm``/``torch.gru``).  Dynamo treats
    ``torch.nn.LSTM`` the same way: its CPU (oneDNN) kernel has no fake-tensor form, and its
    decomposition would unroll the time loop into the graph and recompile for every length.
    Autograd runs through it as in eager, so training is unchanged."""
    return fn(*args)


def eager_when_compiled(fn, *args):
    """``fn(*args)``; while torch.compile traces, in an intended graph break
    (``outside_compile``): for the layer cores that loop over the length in Python, which
    a trace would unroll per length (a recompile at every new length)."""
    if torch.compiler.is_compiling():
        return outside_compile(fn, *args)
    return fn(*args)


def pad_time(t, pad: int):
    """t (B, L, ...) with `pad` zero steps appended along the length."""
    return F.pad(t, (0,) * (2 * (t.dim() - 2)) + (0, pad)) if pad else t


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


def from_zero(x):
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
    """Attributes with defaults and the registry's weights as zero parameters.

    A subclass that sets ``op = "name"`` is the torch layer of that op
    (``LAYERS[name]``).  After building a layer the backend calls
    ``configure(call)`` with the lowered call."""

    op: str = ""
    # the layer's work is one kernel torch.compile cannot trace: the generated forward calls
    # it through ``EAGER.run`` (one graph break at the call, not inside the layer)
    eager_under_compile: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("op"):
            LAYERS[cls.op] = cls

    def configure(self, call) -> None:
        """Take the compiler's decisions from the lowered call: the plan (and the
        per-call threshold table when the plan is chosen per call), the fusion
        region, and the compiled discretization (``self.discretize_fn``)."""
        plan = getattr(call, "plan", None)
        if plan is not None:
            self.plan = plan
        self.plan_table = getattr(call, "plan_table", None)
        self.region = getattr(call, "region", None)
        program = getattr(call, "disc", None)
        if program is not None or hasattr(self, "discretize_fn"):   # only layers with dynamics carry one
            self.set_discretization(program)

    def set_discretization(self, program) -> None:
        """Keep the call's discretization program and its torch function, compiled once here
        (no sympy at run time); None leaves the layer deriving it from its ``disc`` attribute."""
        self.disc_program = program
        self.discretize_fn = None if program is None else program.compile("torch")

    def __init__(self, in_features, attrs: dict):
        super().__init__()
        self.in_features = [int(f) for f in in_features]
        self.attrs = with_defaults(self.op, dict(attrs))
        weights = OPS[self.op].weights          # None: a weight-free stateful op (e.g. mean over time)
        shapes = weights(stand_in_shapes(self.in_features), self.attrs) if weights else {}
        self._build({k: v for k, v in shapes.items() if not k.startswith("reverse.")})
        if self.attrs.get("direction") == "bidirectional":      # forward + time-reversed pass (reverse.*)
            from .bidirectional import make_bidirectional
            make_bidirectional(self)

    def _build(self, shapes: dict) -> None:
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))

    def extra_repr(self) -> str:
        """``in_features`` (single-input layers), then the op's shown attributes
        (``OpSpec.shown_attrs``): e.g. ``in_features=32, out=64, bias=False``."""
        spec = OPS[self.op]
        head = [f"in_features={self.in_features[0]}"] \
            if len(self.in_features) == 1 and len(spec.inputs) == 1 and not spec.int_input else []
        shown = spec.shown_attrs(stand_in_shapes(self.in_features), self.attrs)
        return ", ".join(head + [f"{k}={v!r}" for k, v in shown.items()])

    def tie(self, name: str, owner: "Layer", owner_name: str) -> None:
        """Use `owner`'s parameter `owner_name` as this layer's `name` (``tie = other``): the
        parameter stays registered on `owner` only, so the state_dict holds it once and
        gradients, ``.to()`` and loading all act on the one tensor."""
        self._parameters.pop(name, None)
        object.__setattr__(self, "_tied_" + name, (owner, owner_name))

    def __getattr__(self, name):
        # on every parameter read (layers' hot paths, decoding): look the registries up
        # directly, as nn.Module.__getattr__ does, instead of calling it and catching
        d = self.__dict__
        for registry in ("_parameters", "_buffers", "_modules"):
            found = d[registry].get(name, d)
            if found is not d:
                return found
        tied = d.get("_tied_" + name)
        if tied is not None:
            return getattr(tied[0], tied[1])
        return super().__getattr__(name)        # raises nn.Module's AttributeError

    def optional(self, name: str):
        """The parameter (or tied parameter) ``name``, None when the layer has none (a
        bias turned off): no AttributeError raised and caught on the hot path."""
        d = self.__dict__
        found = d["_parameters"].get(name)
        if found is None and "_tied_" + name in d:
            return getattr(self, name)
        return found

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
        shapes = OPS[self.op].state(stand_in_shapes(self.in_features), self.attrs)
        dtype = self.state_dtype(dtype)
        return {k: torch.zeros((batch,) + tuple(s), dtype=dtype, device=device) for k, s in shapes.items()}

    def step(self, *inputs_t, state=None):
        seq = [None if x is None else x.unsqueeze(1) for x in inputs_t]
        y, new_state = self(*seq, state=state, return_state=True)
        return y[:, 0], new_state


@compiler_disable
def discretized(structure: str, method: str):
    """The torch function generated from the sympy derivation, looked up on every
    call (so a changed derivation takes effect) but outside torch.compile's
    tracing: dynamo must not trace into sympy."""
    return discretizer(structure, method, "torch")
