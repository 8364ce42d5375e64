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
        """Inputs must match the spec's declared shapes (symbols bound consistently) and element types."""
        check_inputs(self._inputs, xs, step=step)

    def state_options(self) -> dict:
        p = next((p for p in self.parameters() if p.is_floating_point()), self._dtype_probe)
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


def _table_planner(table):
    """plan_for(batch, length, training) -> the plan the compile-time threshold table gives."""

    @torch.compiler.disable       # plain Python look-ups; torch.compile guards on the shapes instead
    def plan_for(batch, length, training):
        return table.choose(batch, length, training)
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
    return {"SeqcModule": SeqcModule, "run": run, "fn": SimpleNamespace(**functional.FUNCTIONS)}


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
