"""The compiled PyTorch model: the module tree built from the lowered program's
layers (their hierarchical names, so ``get_submodule`` and ``state_dict`` keys
follow the spec), the base class the generated code subclasses, and weight
loading.  The module tree and the generated code come from the one
``Program``: the code's ``M[i]`` is the i-th of ``program.layers()``.

Nothing here imports the compiler's passes: a layer whose plan is chosen per
call reads it from the threshold table the planner left on its call."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from seqc.codegen import compile_source
from seqc.errors import SeqcError
from seqc.inputs import check_inputs, declared_inputs

from . import functional
from .base import EAGER, compiler_disable
from .codegen import as_program, class_name, emit
from .layers import LAYERS


class Container(nn.Module):
    """A block instance: holds the layers named inside it; `[i]` reaches repeats."""

    def __getitem__(self, key):
        return self._modules[str(key)]

    def __len__(self):
        return len(self._modules)


def run(layer, *args, state, return_state, lengths):
    """Call a stateful layer; always give back (output, state or None).  An empty
    sequence (a streaming chunk with no tokens) leaves the state as it was."""
    x = args[0]
    if x.shape[1] == 0:
        out = x.new_zeros(x.shape[0], 0, layer.out_features)
        if return_state and state is None:
            state = layer.init_state(x.shape[0], out.dtype, x.device)
        return out, (state if return_state else None)
    out = layer(*args, state=state, return_state=return_state, lengths=lengths)
    return out if return_state else (out, None)


class SeqcModule(nn.Module):
    """Base of every generated model: builds layers, holds the IR and the source."""

    def __init__(self, program, source: str):
        super().__init__()
        object.__setattr__(self, "program", program)
        object.__setattr__(self, "graph", program.graph)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "_traced", None)
        layers = program.layers()
        _build_tree(self, layers)
        # the layers in program order, for the generated code (not registered twice)
        object.__setattr__(self, "_layer_paths", tuple(tuple(c.name.split(".")) for c in layers))
        object.__setattr__(self, "_inputs", declared_inputs(program.graph))
        object.__setattr__(self, "_vocab", token_vocabularies(program.graph))
        object.__setattr__(self, "_state_shapes", {})
        object.__setattr__(self, "_accepted_inputs", set())     # input signatures check_inputs accepted
        # state keys a layer may add beyond its init_state (attention's ragged-length mask)
        object.__setattr__(self, "_optional_state", {c.state_key: getattr(m, "optional_state", ())
                                                     for c, m in zip(layers, self.layer_modules) if c.stateful})
        # follows .double() / .to(device) like a weight, so a model without weights knows its dtype
        self.register_buffer("_dtype_probe", torch.zeros(()), persistent=False)

    @property
    def layer_modules(self) -> tuple:
        """The layer modules in program order, read through the registered submodules on
        every call (plain dict look-ups), so a swapped-in module (LoRA, quantisation) is used."""
        out = []
        for path in self._layer_paths:
            m = self
            for key in path:
                m = m._modules[key]
            out.append(m)
        return tuple(out)

    def check_inputs(self, *xs, step: bool = False) -> None:
        """Inputs must be torch tensors on the model's device, match the spec's declared shapes
        (symbols bound consistently) and element types; float inputs must have the model's
        dtype (no silent conversion: ``x.to(dtype)`` or ``model.to(dtype)``); token ids must
        lie in ``[0, vocab)`` of every embedding that reads them."""
        opts = self.state_options()
        for x, (name, _, _) in zip(xs, self._inputs):
            if not isinstance(x, torch.Tensor):
                raise SeqcError(f"input '{name}' is a {type(x).__module__}.{type(x).__name__}, not a torch tensor; "
                                f"convert it with torch.as_tensor(...) (the torch backend does not convert inputs)")
        # shapes, dtypes and devices already accepted (decoding checks every token's): only the token ids
        compiling = torch.compiler.is_compiling()     # dynamo guards on shapes itself; no cache to trace
        key = None if compiling else (step, opts["dtype"], opts["device"], len(xs)) + tuple(
            (x.shape, x.dtype, x.device) for x in xs)
        if key is not None and key in self._accepted_inputs:
            for x, (name, _, _) in zip(xs, self._inputs):
                if name in self._vocab:
                    _check_tokens(name, x, self._vocab[name])
            return
        check_inputs(self._inputs, xs, step=step)
        for x, (name, _, dtype) in zip(xs, self._inputs):
            if x.device != opts["device"]:
                raise SeqcError(f"input '{name}' is on {x.device} but the model is on {opts['device']}; "
                                f"move one of them (x.to('{opts['device']}') or model.to('{x.device}'))")
            if dtype != "int" and x.dtype != opts["dtype"]:
                raise SeqcError(f"input '{name}' is {x.dtype} but the model computes in {opts['dtype']}; "
                                f"convert the input (x.to({opts['dtype']})) or the model (model.to({x.dtype}))")
            if name in self._vocab:
                _check_tokens(name, x, self._vocab[name])
        if key is not None:
            if len(self._accepted_inputs) > 64:
                self._accepted_inputs.clear()
            self._accepted_inputs.add(key)

    def check_batch(self, batch) -> None:
        """``init_state``'s batch: a non-negative Python int."""
        if isinstance(batch, torch.Tensor) and batch.dim() == 0 and not batch.is_floating_point():
            batch = int(batch)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
            raise SeqcError(f"init_state(batch): batch must be a non-negative int, got {batch!r}")

    def check_state(self, state, batch) -> None:
        """A state handed to forward / step must have exactly the keys, nesting and tensor
        shapes of ``init_state(batch)`` (a dimension it leaves at 0 is a cache that grows
        and may have any size) (a state with unknown or missing keys would otherwise
        be ignored and the run start from zeros), on the model's device."""
        if state is None:
            return
        if not isinstance(state, dict):
            raise SeqcError(f"state must be the dict init_state() or a previous call returned, got {type(state).__name__}")
        want = self._state_shapes.get(batch)
        if want is None:
            want = self._state_shapes[batch] = _shapes(self.init_state(batch))
        device = self.state_options()["device"]
        if not _state_ok(state, want, device, self._optional_state):   # the located error, or a rarer layout
            _match_state(state, want, "state", device, self._optional_state)

    def last_plans(self) -> dict:
        """{layer name: the plan it ran} for every layer with an execution plan, in program
        order: the plan of its most recent call where the layer chooses per call
        (``last_plan``, None before its first call), else the plan compiled into it."""
        out = {}
        for call, mod in zip(self.program.layers(), self.layer_modules):
            plan = getattr(mod, "last_plan", None) or getattr(mod, "plan", None) or call.plan
            if plan is not None:
                out[call.name] = None if plan == "auto" else plan
        return out

    def state_options(self) -> dict:
        """dtype and device of the first floating parameter (``self.parameters()``'s order),
        else of the probe buffer; read on every call and token, so a plain walk of the
        registries rather than the ``parameters()`` generator."""
        p = _first_float_parameter(self)
        p = self._dtype_probe if p is None else p
        return {"dtype": p.dtype, "device": p.device}

    def trace(self, *xs, hook=None) -> tuple:
        """(output, {node_id: value}) - every intermediate result, for difftest;
        ``hook(node_id, value)`` may replace a result as it is computed."""
        if self._traced is None:
            ns = compile_source(emit(self.program, trace=True), self.program.model + "-traced", _namespace())
            object.__setattr__(self, "_traced", ns[class_name(self.program)].forward_traced)
        values = {}
        out = self._traced(self, *xs, trace=values, hook=hook)
        return out, values

    def load_numpy(self, weights: dict) -> "SeqcModule":
        """Load a dict of NumPy arrays keyed like state_dict (e.g. from seqc.init)."""
        own = self.state_dict()
        missing = [k for k in own if k not in weights]
        unexpected = [k for k in weights if k not in own]
        if missing or unexpected:
            raise SeqcError(f"weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for k, t in own.items():
                v = torch.as_tensor(np.asarray(weights[k]))
                if tuple(v.shape) != tuple(t.shape):
                    raise SeqcError(f"weight '{k}' has shape {tuple(v.shape)}, expected {tuple(t.shape)}")
                t.copy_(v.to(t.dtype))
        return self


def _first_float_parameter(module):
    """The first floating parameter in ``module.parameters()`` order (the module, then its
    submodules depth first), or None."""
    for p in module._parameters.values():
        if p is not None and p.is_floating_point():
            return p
    for child in module._modules.values():
        if child is not None:
            p = _first_float_parameter(child)
            if p is not None:
                return p
    return None


def token_vocabularies(graph) -> dict:
    """{input name: the smallest vocabulary of the embeddings that read it}."""
    out = {}
    for nid in graph.inputs:
        vocabs = [u.attrs["vocab"] for u in graph.users(nid) if u.op == "embedding"]
        if vocabs:
            out[graph.nodes[nid].attrs["name"]] = int(min(vocabs))
    return out


@compiler_disable       # reads two numbers back from the device; torch.compile guards the rest
def _check_tokens(name, x, vocab) -> None:
    """Token ids outside [0, vocab) are a user error here, not an IndexError (or, on a GPU,
    a device-side assert that poisons the CUDA context) inside the embedding."""
    if x.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(x))
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise SeqcError(f"input '{name}' holds token id {bad}, outside the vocabulary [0, {vocab})")


def _shapes(state):
    """The nesting of a state with every tensor replaced by its shape."""
    if isinstance(state, dict):
        return {k: _shapes(v) for k, v in state.items()}
    if isinstance(state, (tuple, list)):
        return tuple(_shapes(v) for v in state)
    return tuple(state.shape) if isinstance(state, torch.Tensor) else state


def _state_ok(got, want, device, optional=None) -> bool:
    """The check of ``_match_state`` without building a message: True when ``got`` surely
    matches (decoding checks the state on every token, so the common case stays cheap);
    False sends the caller to ``_match_state`` for the verdict and the located error."""
    if type(want) is not dict:
        return _leaf_ok(got, want, device)
    if type(got) is not dict:
        return False
    if got.keys() != want.keys():
        if type(optional) is dict or not optional:
            return False
        if not (want.keys() <= got.keys() and got.keys() - want.keys() <= set(optional)):
            return False
    per_key = optional if type(optional) is dict else None
    for k, w in want.items():
        if type(w) is dict:
            if not _state_ok(got[k], w, device, per_key.get(k, ()) if per_key is not None else None):
                return False
        elif not _leaf_ok(got[k], w, device):
            return False
    return True


def _leaf_ok(got, want, device) -> bool:
    """A tensor of init_state's shape (0: any size) on ``device``; anything else (nested
    sequences of tensors) takes the full check."""
    if type(got) is not torch.Tensor or type(want) is not tuple or got.device != device:
        return False
    shape = got.shape
    if len(shape) != len(want):
        return False
    for g, w in zip(shape, want):
        if w and g != w:
            return False
    return True


def _match_state(got, want, where, device, optional=None) -> None:
    """``got`` has ``want``'s nesting and shapes; ``optional`` ({layer key: extra keys the
    layer may add}, at the top level only) names keys beyond init_state's that are allowed."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            raise SeqcError(f"{where} must be a dict with keys {sorted(want)}, got {type(got).__name__}")
        extra = set() if isinstance(optional, dict) else set(optional or ())
        unknown, missing = sorted(set(got) - set(want) - extra, key=str), sorted(set(want) - set(got), key=str)
        if unknown or missing:
            raise SeqcError(f"{where} does not match the model's state: "
                            + ", ".join(x for x in (f"unknown keys {unknown}" if unknown else "",
                                                    f"missing keys {missing}" if missing else "") if x)
                            + f" (expected {sorted(want, key=str)}; start from model.init_state(batch))")
        for k in want:
            _match_state(got[k], want[k], f"{where}[{k!r}]", device,
                         optional.get(k, ()) if isinstance(optional, dict) else None)
        return
    if isinstance(want, tuple) and want and not all(isinstance(d, int) for d in want):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            raise SeqcError(f"{where} must be a sequence of {len(want)} tensors")
        for i, (g, w) in enumerate(zip(got, want)):
            _match_state(g, w, f"{where}[{i}]", device)
    elif isinstance(want, tuple):
        if not isinstance(got, torch.Tensor):
            raise SeqcError(f"{where} must be a tensor of shape {want}, got {type(got).__name__}")
        # a dimension init_state leaves empty grows with the sequence (a key/value cache)
        if got.dim() != len(want) or any(w and g != w for g, w in zip(got.shape, want)):
            raise SeqcError(f"{where} has shape {tuple(got.shape)}, expected {want} "
                            f"(what init_state(batch) gives for the input's batch)")
        if got.device != device:
            raise SeqcError(f"{where} is on {got.device} but the model is on {device}")


def _table_planner(table):
    """plan_for(batch, length, training) -> the plan the compile-time threshold table gives
    (``PlanTable.choose``), by comparisons only: under torch.compile a symbolic batch and length
    become guards on the table's breakpoints, so a new length recompiles only where the plan
    changes.  The nearest batch by log-ratio (ties to the smaller) is the first ``b_i`` with
    ``batch^2 <= b_i b_(i+1)``, in integers."""
    batches = sorted(table.batches)
    bounds = [a * b for a, b in zip(batches, batches[1:])]

    def plan_for(batch, length, training):
        batch = torch.sym_max(batch, 1)
        chosen = batches[-1]
        for b, bound in zip(batches, bounds):
            if batch * batch <= bound:
                chosen = b
                break
        row = table.rows[(bool(training), chosen)]
        plan = row[0][1]
        for start, p in row[1:]:
            if length >= start:
                plan = p
        return plan
    return plan_for


def make_layer(call) -> nn.Module:
    """The layer module of one lowered call, configured from it (plan, threshold table,
    fusion region, discretization program)."""
    in_features = [int(s[-1]) if len(s) and getattr(s[-1], "is_number", True) else 1 for s in call.input_shapes]
    mod = LAYERS[call.op](in_features, dict(call.attrs))
    if call.plan is not None:
        mod.plan = call.plan
    if call.plan == "auto" and call.plan_table is not None:
        mod.plan_for = _table_planner(call.plan_table)
    configure = getattr(mod, "configure", None)
    if configure is not None:
        configure(call)
    elif call.region is not None:
        mod.region = call.region
    mod.out_features = int(call.shapes[0][-1])
    return mod


def _build_tree(root: nn.Module, calls) -> None:
    layers = {c.name: make_layer(c) for c in calls}
    paths = set()
    for name in layers:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            paths.add(".".join(parts[:i]))
    made = {"": root}
    for path in sorted(paths, key=lambda p: (p.count("."), p)):
        parent, _, leaf = path.rpartition(".")
        mod = layers.get(path) or Container()
        made[parent].add_module(leaf, mod)
        made[path] = mod
    for c in calls:                          # tie = other: share other's Parameter (one state_dict key)
        if c.attrs.get("tie"):
            layers[c.name].tie("weight", layers[c.attrs["tie"]], "weight")


def _namespace() -> dict:
    return {"SeqcModule": SeqcModule, "run": run, "fn": SimpleNamespace(**functional.FUNCTIONS), "EAGER": EAGER}


def build_module(program, weights: dict | None = None) -> SeqcModule:
    """The model of a lowered program (or of a planned graph, lowered here)."""
    program = as_program(program)
    source = emit(program)
    ns = compile_source(source, program.model, _namespace())
    cls = ns[class_name(program)]
    model = cls(program, source)
    if weights is not None:
        model.load_numpy(weights)
    return model
