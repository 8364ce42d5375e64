"""Lowering: the planned IR -> a flat program of calls that every backend renders.

A ``Program`` is a list of ``Call``s over named variables (``v3``, ``v3_1``),
in topological order.  It fixes everything backends share: variable naming,
which calls are layers (own weights or state), their weight prefixes and state
keys, the plan chosen for each layer (with its length-threshold table when the
plan is chosen per call), the discretization program of SSM layers, and the
fusion regions.  Backends only decide how one call is spelled (see
``seqc.codegen``); a backend's module tree and its generated code both come
from the one ``Program``.

This module also defines the two records the passes hand to backends through
the IR: ``Region`` (a fusion region: an anchor and the elementwise work it
performs) and ``PlanTable`` (per-call plan choice decided at compile time).
Neither needs the passes at run time.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

from .ir import Graph, Ref


@dataclass(frozen=True)
class Region:
    """One fusion region: an anchor (scan / convolution) with the elementwise
    work it performs inside its one kernel.

    ``nodes`` lists every member (anchor first); ``prologue`` / ``epilogue`` the
    member nodes that run before / after the anchor (elementwise consumers not
    folded into it); ``inputs`` / ``outputs`` the values entering and leaving the
    region; ``flags`` the kernel's specialisation constants."""

    id: str
    anchor: int
    nodes: tuple[int, ...]
    prologue: tuple[int, ...]
    epilogue: tuple[int, ...]
    inputs: tuple[Ref, ...]
    outputs: tuple[Ref, ...]
    flags: dict = field(default_factory=dict, hash=False, compare=True)


@dataclass(frozen=True)
class PlanTable:
    """The plan a layer runs, by shape, decided at compile time from the cost model.

    ``rows[(training, batch)]`` is a sorted tuple of ``(min_length, plan)``
    breakpoints: the plan for ``length`` is the one of the last breakpoint
    ``<= length``.  A batch size not in ``batches`` uses the nearest one (by
    ratio)."""

    batches: tuple[int, ...]
    rows: dict = field(hash=False)

    def choose(self, batch: int, length: int, training: bool) -> str:
        row = self.rows[(bool(training), self._batch(int(batch)))]
        return row[max(0, bisect_right([b for b, _ in row], int(length)) - 1)][1]

    def _batch(self, batch: int) -> int:
        if batch in self.batches:
            return batch
        return min(self.batches, key=lambda b: (abs(math.log(b / max(batch, 1))), b))

    def plans(self) -> set[str]:
        return {p for row in self.rows.values() for _, p in row}


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
    spec: Any = None               # the op's OpSpec
    span: Any = None               # source location of the node
    input_shapes: tuple = ()       # shapes of the arguments (symbolic dims stay symbols)
    shapes: tuple = ()             # shapes of the results

    @property
    def state_key(self) -> str:
        return self.name or f"%{self.node}"

    @property
    def is_layer(self) -> bool:
        """Owns weights or a recurrent state: a module of its own in the backends."""
        return self.has_weights or self.stateful

    @property
    def plan(self) -> str | None:
        return self.meta.get("plan")

    @property
    def plan_table(self) -> PlanTable | None:
        return self.meta.get("plan_table")

    @property
    def disc(self):
        """The node's compiled-discretization program (set by the discretize pass), or None."""
        return self.meta.get("disc")

    @property
    def region(self) -> Region | None:
        """The fusion region this call anchors, or None."""
        return self.meta.get("region")

    @property
    def where(self) -> str:
        s = self.span
        return f"{s.file}:{s.line}:{s.column}" if s is not None else ""


@dataclass
class Program:
    model: str
    inputs: list[str]
    outputs: list[str]
    calls: list[Call]
    regions: list[Region] = field(default_factory=list)
    graph: Graph | None = None     # the planned IR it was lowered from (declared inputs, weight shapes)

    def stateful_calls(self) -> list[Call]:
        return [c for c in self.calls if c.stateful]

    def layers(self) -> list[Call]:
        """The calls that are layers, in program order (module tree and generated code both use this)."""
        return [c for c in self.calls if c.is_layer]

    def call(self, node: int) -> Call:
        return next(c for c in self.calls if c.node == node)


def var(ref: Ref, n_outputs: int) -> str:
    return f"v{ref.node}" if n_outputs == 1 else f"v{ref.node}_{ref.index}"


def _schedule(graph: Graph, order: list) -> list:
    """Topological order with each region's epilogue members moved right after the
    anchor (or the previous member) whenever their other inputs are already computed,
    so a region runs as one stretch of code."""
    ids = [n.id for n in order]                 # ints: list.index compares cheaply
    for n in order:
        region = n.meta.get("region")
        if region is None:
            continue
        at = ids.index(n.id)
        for member in region.epilogue:
            m = graph.nodes[member]
            pos = ids.index(member)
            if pos > at + 1:
                done = set(ids[:at + 1]).union(graph.inputs)
                if all(r.node in done for r in m.inputs):
                    ids.pop(pos)
                    ids.insert(at + 1, member)
            at = ids.index(member)
    return [graph.nodes[i] for i in ids]


def lower(graph: Graph) -> Program:
    calls = []
    inputs = []
    for n in _schedule(graph, graph.order()):
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
                          dict(n.meta), spec=spec, span=n.span, input_shapes=tuple(n.input_shapes),
                          shapes=tuple(n.shapes)))
    outputs = [var(r, len(graph.nodes[r.node].shapes)) for r in graph.outputs]
    regions = [c.region for c in calls if c.region is not None]
    return Program(graph.name, inputs, outputs, calls, regions, graph)
