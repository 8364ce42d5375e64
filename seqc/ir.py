"""The graph IR: small node records on a ``networkx.DiGraph``, a verifier, a
stable text dump and a Graphviz DOT export.

A node is one op application.  Its inputs are ordered references
``(node_id, output_index)``; the same references are mirrored as DiGraph edges
(attribute ``slot`` = input position) so graph algorithms see the dataflow.
Passes annotate ``node.meta`` (plan, fusion region, discretization, ...).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import networkx as nx

from .errors import Span
from .registry import OPS


class Ref(NamedTuple):
    node: int
    index: int = 0

    def __str__(self) -> str:
        return f"%{self.node}" + (f".{self.index}" if self.index else "")


@dataclass
class Node:
    id: int
    op: str                          # a registry op, or "input"
    inputs: tuple[Ref, ...]
    attrs: dict[str, Any]
    shapes: tuple[tuple, ...]        # one shape per output; dims are ints or sympy expressions
    dtype: str = "float"             # float | int
    name: str = ""                   # hierarchical module / value name
    span: Span | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self):
        return OPS.get(self.op)

    @property
    def shape(self) -> tuple:
        return self.shapes[0]

    def weight_shapes(self) -> dict[str, tuple]:
        """The weights this node owns (a tied weight belongs to the layer it is tied to)."""
        spec = self.spec
        if spec is None or spec.weights is None:
            return {}
        return {k: v for k, v in spec.weights(self.input_shapes, self.attrs).items() if k not in self.tied()}

    def tied(self) -> dict[str, str]:
        """{own weight name: the state_dict key it reads} for a layer with ``tie = other``."""
        return {"weight": join(self.attrs["tie"], "weight")} if self.attrs.get("tie") else {}

    # filled by Graph.add so specs can see their input shapes
    input_shapes: tuple = ()


def dims_equal(a, b) -> bool:
    """Whether two dimensions (ints or sympy expressions) are provably equal.
    Cheap checks first; ``sympy.simplify`` (which can take very long) only on
    expressions of at most SEQC_MAX_DIM_OPS operations."""
    if a == b:
        return True
    import sympy

    from .limits import limit
    d = sympy.sympify(a) - sympy.sympify(b)
    if d.is_number:
        return d == 0
    if sympy.expand(d) == 0:
        return True
    if sympy.count_ops(d) > limit("SEQC_MAX_DIM_OPS"):
        return False
    return sympy.simplify(d) == 0


def join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


class Graph:
    """A model after elaboration: nodes in a valid topological order."""

    def __init__(self, name: str, params: dict[str, Any] | None = None):
        self.name = name
        self.params = dict(params or {})
        self.nodes: dict[int, Node] = {}
        self.inputs: list[int] = []
        self.outputs: list[Ref] = []
        self.nx = nx.DiGraph()
        self._next = 0
        self._shapes_checked: dict = {}        # verify's memo: node id -> what passed its shape check

    # -- construction -----------------------------------------------------------
    def add(self, op: str, inputs, attrs, shapes, *, dtype="float", name="", span=None, meta=None) -> Node:
        node = Node(self._next, op, tuple(Ref(*r) for r in inputs), dict(attrs), tuple(tuple(s) for s in shapes),
                    dtype, name, span, dict(meta or {}))
        node.input_shapes = tuple(self.shape_of(r) for r in node.inputs)
        self._next += 1
        self.nodes[node.id] = node
        self.nx.add_node(node.id, node=node)
        for slot, r in enumerate(node.inputs):
            self.nx.add_edge(r.node, node.id, slot=slot, index=r.index)
        if op == "input":
            self.inputs.append(node.id)
        return node

    def remove(self, node_id: int) -> None:
        del self.nodes[node_id]
        self.nx.remove_node(node_id)

    def replace_uses(self, old: Ref, new: Ref) -> None:
        """Make every user of `old` read `new` instead."""
        for n in self.users(old.node):
            if old in n.inputs:
                self.set_inputs(n, tuple(new if r == old else r for r in n.inputs))
        self.outputs = [new if r == old else r for r in self.outputs]

    def set_inputs(self, node: Node, inputs) -> None:
        """Replace a node's inputs, keeping the DiGraph edges in step."""
        for src in list(self.nx.predecessors(node.id)):
            self.nx.remove_edge(src, node.id)
        node.inputs = tuple(Ref(*r) for r in inputs)
        node.input_shapes = tuple(self.shape_of(r) for r in node.inputs)
        for slot, r in enumerate(node.inputs):
            self.nx.add_edge(r.node, node.id, slot=slot, index=r.index)

    def copy(self) -> "Graph":
        g = Graph(self.name, self.params)
        g._next = self._next
        g.inputs = list(self.inputs)
        g.outputs = list(self.outputs)
        for n in self.nodes.values():
            c = dataclasses.replace(n, attrs=dict(n.attrs), meta=dict(n.meta))
            c.input_shapes = n.input_shapes
            g.nodes[c.id] = c
        g.nx = self.nx.copy()
        g._shapes_checked = dict(self._shapes_checked)
        for nid in g.nodes:
            g.nx.nodes[nid]["node"] = g.nodes[nid]
        return g

    # -- queries ------------------------------------------------------------------
    def shape_of(self, ref: Ref) -> tuple:
        return self.nodes[ref.node].shapes[ref.index]

    def order(self) -> list[Node]:
        return [self.nodes[i] for i in sorted(self.nodes)]

    def users(self, node_id: int) -> list[Node]:
        return [self.nodes[s] for s in sorted(self.nx.successors(node_id))]

    def layers(self) -> list[Node]:
        """Nodes that own weights or state (the modules of a backend)."""
        return [n for n in self.order() if n.spec is not None and n.spec.is_layer]

    def weight_shapes(self) -> dict[str, tuple]:
        out = {}
        for n in self.order():
            for k, s in n.weight_shapes().items():
                out[join(n.name, k)] = tuple(int(d) for d in s)
        return out

    # -- checking -----------------------------------------------------------------
    def verify(self) -> None:
        """Check the IR's invariants; a failure is a compiler bug, not a user error.
        (It runs after every pass, so the loop reads the tables directly.)"""
        problems = []
        seen_keys: dict[str, int] = {}
        state_keys: dict[str, int] = {}
        nodes = self.nodes
        has_edge = self.nx.has_edge
        for nid in sorted(nodes):
            n = nodes[nid]
            spec = OPS.get(n.op)
            if spec is None and n.op != "input":
                problems.append(f"%{n.id}: unknown op {n.op}")
            ins = []
            for r in n.inputs:
                src = nodes.get(r.node)
                if src is None:
                    problems.append(f"%{n.id}: input {r} does not exist")
                elif r.node >= n.id:
                    problems.append(f"%{n.id}: input {r} is not defined before it")
                elif r.index >= len(src.shapes):
                    problems.append(f"%{n.id}: input {r} has no output {r.index}")
                else:
                    ins.append(src.shapes[r.index])
                    if not has_edge(r.node, n.id):
                        problems.append(f"%{n.id}: edge from {r} missing in the DiGraph")
            if spec is not None and not spec.variadic:
                lo = len(spec.inputs) - len(spec.optional_inputs)
                if not lo <= len(n.inputs) <= len(spec.inputs):
                    problems.append(f"%{n.id}: {n.op} takes {len(spec.inputs)} inputs, has {len(n.inputs)}")
            weight_keys: tuple = ()
            if spec is not None:
                found, weight_keys = self._check_node_once(n, shapes=not problems, ins=tuple(ins))
                problems += found
                if spec.stateful:
                    if n.name in state_keys:
                        problems.append(f"%{n.id}: state key '{n.name}' also belongs to %{state_keys[n.name]}")
                    state_keys[n.name] = n.id
            for key in weight_keys:
                if key in seen_keys:
                    problems.append(f"%{n.id}: weight key {key} also belongs to %{seen_keys[key]}")
                seen_keys[key] = n.id
        for r in self.outputs:
            if r.node not in nodes or r.index >= len(nodes[r.node].shapes):
                problems.append(f"output {r} does not exist")
        if set(self.nx.nodes) != set(nodes):
            problems.append("DiGraph nodes differ from the node table")
        if not all(a < b for a, b in self.nx.edges):     # ids only grow along edges: no cycle
            problems.append("the graph has a cycle (an edge runs to an earlier node)")
        if problems:
            raise AssertionError("IR verification failed:\n  " + "\n  ".join(problems))

    def _check_node_once(self, n: Node, shapes: bool, ins: tuple) -> tuple[list[str], tuple]:
        """(problems, weight keys) of node `n`: its shape check (`_check_shapes`, when
        `shapes`) and the weights it owns.  Both are pure functions of the op, the
        attributes, the name and the shapes, so a node whose check passed before on
        the very same shape objects (held here and compared with ``is``, so no id is
        reused) and equal attributes is not checked again: passes leave most nodes
        alone, and verifying after every pass costs one check per changed node."""
        if not shapes:
            return [], tuple(join(n.name, k) for k in n.weight_shapes())
        seen = self._shapes_checked.get(n.id)       # ins: the input shapes (verify has looked them up)
        if (seen is not None and seen[0] == n.op and seen[1] == n.name and seen[2] is n.shapes
                and seen[3] is n.input_shapes and len(seen[4]) == len(ins)
                and all(x is y for x, y in zip(seen[4], ins)) and seen[5] == n.attrs):
            return [], seen[6]
        problems = _check_shapes(self, n)
        names = tuple(join(n.name, k) for k in n.weight_shapes())
        if not problems:
            self._shapes_checked[n.id] = (n.op, n.name, n.shapes, n.input_shapes, ins, dict(n.attrs), names)
        return problems, names

    # -- printing -----------------------------------------------------------------
    def dump(self) -> str:
        """One line per node, parameters sorted, source location as a comment."""
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in self.params.items())
        lines = [f"model {self.name}({params}) {{"]
        for n in self.order():
            lines.append("  " + format_node(n))
        lines.append("  return " + ", ".join(str(r) for r in self.outputs))
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_dot(self) -> str:
        out = [f'digraph "{self.name}" {{', "  rankdir=TB;", '  node [shape=box, fontname="monospace"];']
        regions: dict[str, list[int]] = {}
        for n in self.order():
            label = f"%{n.id} {n.op}"
            if n.name:
                label += f"\\n{n.name}"
            label += "\\n" + " ".join(_fmt_shape(s, n.dtype) for s in n.shapes)
            if "plan" in n.meta:
                label += f"\\nplan={n.meta['plan']}"
            if "fusion" in n.meta:
                label += f"\\nfusion={n.meta['fusion']}"
                regions.setdefault(n.meta["fusion"], []).append(n.id)
            style = ', style=filled, fillcolor="#e8f0ff"' if n.spec is not None and n.spec.has_weights else ""
            out.append(f'  n{n.id} [label="{label}"{style}];')
        for rid, members in regions.items():
            out.append(f'  subgraph "cluster_{rid}" {{ label="{rid}"; style=dashed; '
                       + " ".join(f"n{m};" for m in members) + " }")
        for a, b in sorted(self.nx.edges):
            out.append(f"  n{a} -> n{b};")
        out.append("  out [shape=oval, label=\"output\"];")
        for r in self.outputs:
            out.append(f"  n{r.node} -> out;")
        out.append("}")
        return "\n".join(out) + "\n"


def _check_shapes(g: "Graph", n: Node) -> list[str]:
    """The node's recorded shapes and input shapes agree with the registry's rule."""
    import sympy

    ins = tuple(g.shape_of(r) for r in n.inputs)
    if ins != tuple(n.input_shapes):
        return [f"%{n.id}: stale input shapes {n.input_shapes} (inputs now give {ins})"]
    try:
        want = n.spec.shape(list(ins), n.attrs)
    except Exception as e:  # noqa: BLE001 - any failure of the rule is a broken invariant
        return [f"%{n.id}: {n.op} rejects its inputs: {e}"]
    same = len(want) == len(n.shapes) and all(
        len(a) == len(b) and all(dims_equal(x, y) for x, y in zip(a, b))
        for a, b in zip(want, n.shapes))
    return [] if same else [f"%{n.id}: recorded shapes {n.shapes} but {n.op} gives {tuple(map(tuple, want))}"]


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _fmt_shape(shape, dtype) -> str:
    return ("i64" if dtype == "int" else "f32") + "[" + ", ".join(str(d) for d in shape) + "]"


def format_node(n: Node) -> str:
    spec = n.spec
    shown = {k: v for k, v in n.attrs.items()
             if spec is None or spec.attr(k) is None or spec.attr(k).default != v or k == "plan"}
    attrs = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(shown.items()))
    meta = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(n.meta.items()) if k in ("plan", "fusion", "fused", "disc_form"))
    head = f"%{n.id} = {n.op}"
    if attrs:
        head += f"[{attrs}]"
    head += "(" + ", ".join(str(r) for r in n.inputs) + ")"
    if len(n.shapes) == 1:
        head += " : " + _fmt_shape(n.shape, n.dtype)
    else:
        head += " : (" + ", ".join(_fmt_shape(s, n.dtype) for s in n.shapes) + ")"
    if meta:
        head += f" {{{meta}}}"
    tail = []
    if n.name:
        tail.append(n.name)
    if n.span is not None:
        tail.append(f"{_short(n.span.file)}:{n.span.line}:{n.span.column}")
    return head + ("  # " + " ".join(tail) if tail else "")


def _short(path: str) -> str:
    """A span's file as dumps show it: standard-library files as std/NAME.seq, others by base name."""
    import os
    return path if path.startswith("std/") else os.path.basename(path)
