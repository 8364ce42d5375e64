"""The compiled PyTorch model: the module tree built from the IR's hierarchical
names (so ``get_submodule`` and ``state_dict`` keys follow the spec), the base
class the generated code subclasses, and weight loading."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from seqc.codegen import compile_source
from seqc.errors import SeqcError
from seqc.inputs import check_inputs, declared_inputs

from . import functional
from .codegen import class_name, emit, layer_names
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

    def __init__(self, graph, source: str):
        super().__init__()
        object.__setattr__(self, "graph", graph)
        object.__setattr__(self, "source", source)
        _build_tree(self, graph)
        # the layers in program order, for the generated code (not registered twice)
        object.__setattr__(self, "_layer_paths", tuple(tuple(n.split(".")) for n in layer_names(graph)))
        object.__setattr__(self, "_inputs", declared_inputs(graph))

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
        p = next(self.parameters(), None)
        if p is None:
            return {"dtype": torch.get_default_dtype(), "device": None}
        return {"dtype": p.dtype if p.is_floating_point() else torch.get_default_dtype(), "device": p.device}

    def trace(self, *xs) -> tuple:
        """(output, {node_id: value}) - every intermediate result, for difftest."""
        ns = compile_source(emit(self.graph, trace=True), self.graph.name + "-traced", _namespace())
        values = {}
        out = ns[class_name(self.graph)].forward_traced(self, *xs, trace=values)
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


def _shape_planner(node, graph):
    """plan_for(batch, length, training) -> the cost model's plan for those shapes."""
    from seqc.passes.manager import PlanContext
    from seqc.passes.planner import plan_for_shapes
    ctx = PlanContext(length=None, backend="torch")
    cache = {}

    @torch.compiler.disable       # plain Python arithmetic; torch.compile guards on the shapes instead
    def plan_for(batch, length, training):
        key = (batch, length, training)
        if key not in cache:
            cache[key] = plan_for_shapes(node, ctx, batch, length, training)
        return cache[key]
    return plan_for


def _build_tree(root: nn.Module, graph) -> None:
    layers = {}
    for n in graph.layers():
        in_features = [int(s[-1]) if len(s) and getattr(s[-1], "is_number", True) else 1 for s in n.input_shapes]
        cls = LAYERS[n.op]
        mod = cls(in_features, dict(n.attrs))
        plan = n.meta.get("plan")
        if plan is not None:
            mod.plan = plan
        if plan == "auto":
            mod.plan_for = _shape_planner(n, graph)
        mod.out_features = int(n.shape[-1])
        layers[n.name] = mod
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
    for n in graph.layers():                 # tie = other: share other's Parameter (one state_dict key)
        for own, key in n.tied().items():
            owner, _, leaf = key.rpartition(".")
            layers[n.name].tie(own, layers[owner], leaf)


def _namespace() -> dict:
    return {"SeqcModule": SeqcModule, "run": run, "fn": SimpleNamespace(**functional.FUNCTIONS)}


def build_module(graph, weights: dict | None = None) -> SeqcModule:
    source = emit(graph)
    ns = compile_source(source, graph.name, _namespace())
    cls = ns[class_name(graph)]
    model = cls(graph, source)
    if weights is not None:
        model.load_numpy(weights)
    return model
