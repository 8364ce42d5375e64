"""Lowering: the planned IR -> a flat program of calls that every backend renders.

A ``Program`` is a list of ``Call``s over named variables (``v3``, ``v3_1``),
in topological order.  It fixes everything backends share: variable naming,
which calls are layers (own weights or state), their weight prefixes and state
keys, the plan chosen for each layer, fusion regions.  Backends only decide how
one call is spelled (see ``seqc.codegen``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .ir import Graph, Ref


@dataclass
class Call:
    node: int
    op: str
    outs: list[str]
    args: list[str]
    attrs: dict[str, Any]
    name: str                      # hierarchical module name ('' if none)
    has_weights: bool
    stateful: bool
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def state_key(self) -> str:
        return self.name or f"%{self.node}"


@dataclass
class Program:
    model: str
    inputs: list[str]
    outputs: list[str]
    calls: list[Call]

    def stateful_calls(self) -> list[Call]:
        return [c for c in self.calls if c.stateful]


def var(ref: Ref, n_outputs: int) -> str:
    return f"v{ref.node}" if n_outputs == 1 else f"v{ref.node}_{ref.index}"


def lower(graph: Graph) -> Program:
    calls = []
    inputs = []
    for n in graph.order():
        if n.op == "input":
            inputs.append(var(Ref(n.id), 1))
            continue
        spec = n.spec
        outs = [var(Ref(n.id, i), len(n.shapes)) for i in range(len(n.shapes))]
        args = [var(r, len(graph.nodes[r.node].shapes)) for r in n.inputs]
        attrs = spec.runtime_attrs(n.attrs)
        if "plan" in n.meta and "plan" in attrs:
            attrs["plan"] = n.meta["plan"]
        calls.append(Call(n.id, n.op, outs, args, attrs, n.name, spec.has_weights, spec.stateful,
                          dict(n.meta)))
    outputs = [var(r, len(graph.nodes[r.node].shapes)) for r in graph.outputs]
    return Program(graph.name, inputs, outputs, calls)
