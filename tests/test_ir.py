"""The graph IR built from examples/mamba.seq: ops, hierarchical names,
symbolic shapes, checkpoint keys, the verifier, the dump and the DOT export."""
from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import networkx as nx
import pytest
import sympy

import seqc
from seqc.ir import Ref

ROOT = Path(__file__).resolve().parent.parent
MAMBA = str(ROOT / "examples" / "mamba.seq")
BLOCK_FILE = ROOT / "seqc" / "stdlib" / "mamba_block.seq"   # include "std/mamba_block.seq"
B, L = sympy.Symbol("B", positive=True, integer=True), sympy.Symbol("L", positive=True, integer=True)

# The layer sequence of one Mamba residual block, in dataflow order (mamba_ssm's Mamba block:
# rmsnorm, in_proj, split into x and z, conv1d + silu, x_proj, split into dt, B, C, dt_proj,
# selective scan gated by silu(z), out_proj, residual add).
BLOCK_OPS = [("rmsnorm", "norm"), ("linear", "mixer.in_proj"), ("split", ""), ("conv1d", "mixer.conv1d"),
             ("linear", "mixer.x_proj"), ("split", ""), ("linear", "mixer.dt_proj"), ("selective_ssm", "mixer"),
             ("linear", "mixer.out_proj"), ("add", "")]


def mamba_keys(n_layers):
    """The checkpoint keys of mamba_ssm, as mamba_ssm names them."""
    mixer = ["in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
             "A_log", "D", "out_proj.weight"]
    keys = []
    for i in range(n_layers):
        keys += [f"layers.{i}.mixer.{k}" for k in mixer] + [f"layers.{i}.norm.weight"]
    return keys


def mamba_shapes(d_model, d_state=16, expand=2, d_conv=4, dt_rank=None):
    """mamba_ssm's parameter shapes for one layer (nn.Linear stores (out, in); Conv1d (C, 1, k))."""
    d_inner = expand * d_model
    dt_rank = dt_rank or math.ceil(d_model / 16)
    return {
        "mixer.in_proj.weight": (2 * d_inner, d_model),
        "mixer.conv1d.weight": (d_inner, 1, d_conv),
        "mixer.conv1d.bias": (d_inner,),
        "mixer.x_proj.weight": (dt_rank + 2 * d_state, d_inner),
        "mixer.dt_proj.weight": (d_inner, dt_rank),
        "mixer.dt_proj.bias": (d_inner,),
        "mixer.A_log": (d_inner, d_state),
        "mixer.D": (d_inner,),
        "mixer.out_proj.weight": (d_model, d_inner),
        "norm.weight": (d_model,),
    }


@pytest.fixture(scope="module")
def graph():
    return seqc.build_graph(MAMBA)


# -- structure ----------------------------------------------------------------------------------------

def test_ops_and_hierarchical_names(graph):
    nodes = graph.order()
    assert nodes[0].op == "input" and nodes[0].name == "x" and graph.inputs == [0]
    expected = [(op, f"layers.{i}.{name}" if name else "") for i in range(2) for op, name in BLOCK_OPS]
    assert [(n.op, n.name) for n in nodes[1:]] == expected
    names = {n.name for n in nodes}
    for i in range(2):
        assert {f"layers.{i}.mixer.in_proj", f"layers.{i}.mixer.conv1d", f"layers.{i}.mixer.x_proj",
                f"layers.{i}.mixer.dt_proj", f"layers.{i}.mixer.out_proj", f"layers.{i}.mixer",
                f"layers.{i}.norm"} <= names
    assert not any(n.name.startswith("layers.2") for n in nodes)
    assert graph.outputs == [Ref(nodes[-1].id)]


def test_attributes_from_parameters(graph):
    by_name = {n.name: n for n in graph.order() if n.name}
    assert by_name["layers.0.mixer.in_proj"].attrs["out"] == 256 and by_name["layers.0.mixer.in_proj"].attrs["bias"] is False
    assert by_name["layers.0.mixer.x_proj"].attrs["out"] == 4 + 2 * 16
    assert by_name["layers.0.mixer.dt_proj"].attrs["out"] == 128
    assert by_name["layers.0.mixer.dt_proj"].attrs["bias"] is True
    assert by_name["layers.0.mixer.dt_proj"].attrs["init"] == "mamba_dt"
    conv = by_name["layers.0.mixer.conv1d"]
    assert conv.attrs["kernel"] == 4 and conv.attrs["activation"] == "silu"
    assert by_name["layers.1.mixer"].attrs["d_state"] == 16
    splits = [n for n in graph.order() if n.op == "split"]
    assert [s.attrs["sizes"] for s in splits[:2]] == [2, [4, 16, 16]]
    assert graph.params == {"d_model": 64, "n_layers": 2, "d_state": 16, "expand": 2, "d_conv": 4, "dt_rank": 4}


def test_dataflow_of_a_block(graph):
    n = {node.name: node for node in graph.order() if node.name}
    split_xz, split_dbc = [s for s in graph.order() if s.op == "split"][:2]
    ssm = n["layers.0.mixer"]
    assert split_xz.inputs == (Ref(n["layers.0.mixer.in_proj"].id),)
    assert ssm.inputs == (Ref(n["layers.0.mixer.conv1d"].id), Ref(n["layers.0.mixer.dt_proj"].id),
                          Ref(split_dbc.id, 1), Ref(split_dbc.id, 2), Ref(split_xz.id, 1))
    assert n["layers.0.mixer.conv1d"].inputs == (Ref(split_xz.id, 0),)
    assert n["layers.0.mixer.dt_proj"].inputs == (Ref(split_dbc.id, 0),)
    add0 = graph.nodes[n["layers.0.mixer.out_proj"].id + 1]
    assert add0.op == "add" and add0.inputs == (Ref(0), Ref(n["layers.0.mixer.out_proj"].id))
    assert n["layers.1.norm"].inputs == (Ref(add0.id),)          # layer 1 reads layer 0's residual output


def test_networkx_mirrors_the_inputs(graph):
    g = graph.nx
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    assert set(g.nodes) == set(graph.nodes)
    expected_edges = {(r.node, n.id) for n in graph.order() for r in n.inputs}
    assert set(g.edges) == expected_edges
    for n in graph.order():
        assert g.nodes[n.id]["node"] is n
        for slot, r in enumerate(n.inputs):
            assert r.node < n.id
    assert list(nx.topological_sort(g))[0] == 0


# -- shapes and weights -------------------------------------------------------------------------------------

def test_symbolic_shapes(graph):
    x = graph.nodes[0]
    assert x.shape == (B, L, 64) and x.dtype == "float"
    assert all(isinstance(d, sympy.Symbol) for d in x.shape[:2])
    assert str(x.shape[0]) == "B" and str(x.shape[1]) == "L"
    by_name = {n.name: n for n in graph.order() if n.name}
    assert by_name["layers.0.mixer.in_proj"].shape == (B, L, 256)
    split_xz, split_dbc = [s for s in graph.order() if s.op == "split"][:2]
    assert split_xz.shapes == ((B, L, 128), (B, L, 128))
    assert split_dbc.shapes == ((B, L, 4), (B, L, 16), (B, L, 16))
    assert by_name["layers.0.mixer"].shape == (B, L, 128)
    assert graph.shape_of(graph.outputs[0]) == (B, L, 64)


def test_weight_keys_are_the_mamba_checkpoint_keys(graph):
    shapes = graph.weight_shapes()
    assert sorted(shapes) == sorted(mamba_keys(2))
    for i in range(2):
        for k, s in mamba_shapes(64).items():
            assert shapes[f"layers.{i}.{k}"] == s, k
    assert all(isinstance(d, int) for s in shapes.values() for d in s)


def test_params_override_changes_names_and_shapes():
    g = seqc.build_graph(MAMBA, params={"n_layers": 3, "d_model": 32})
    assert g.params["n_layers"] == 3 and g.params["d_model"] == 32 and g.params["dt_rank"] == 2
    assert g.nodes[0].shape == (B, L, 32)
    assert g.shape_of(g.outputs[0]) == (B, L, 32)
    assert [(n.op, n.name) for n in g.order()[1:]] == \
        [(op, f"layers.{i}.{name}" if name else "") for i in range(3) for op, name in BLOCK_OPS]
    shapes = g.weight_shapes()
    assert sorted(shapes) == sorted(mamba_keys(3))
    for i in range(3):
        for k, s in mamba_shapes(32).items():
            assert shapes[f"layers.{i}.{k}"] == s, k
    g.verify()


def test_zero_layers_is_the_identity():
    g = seqc.build_graph(MAMBA, params={"n_layers": 0})
    assert [n.op for n in g.order()] == ["input"] and g.outputs == [Ref(0)] and g.weight_shapes() == {}


# -- verifier ----------------------------------------------------------------------------------------------

def test_verify_passes(graph):
    graph.verify()
    graph.copy().verify()


def test_verify_detects_input_defined_later(graph):
    g = graph.copy()
    victim = g.nodes[2]
    victim.inputs = (Ref(5),)
    g.nx.add_edge(5, 2)
    with pytest.raises(AssertionError, match=r"%2: input %5 is not defined before it"):
        g.verify()


def test_verify_detects_missing_node_and_output(graph):
    g = graph.copy()
    g.nodes[3].inputs = (Ref(999),)
    g.outputs = [Ref(1234)]
    with pytest.raises(AssertionError) as info:
        g.verify()
    assert "%3: input %999 does not exist" in str(info.value)
    assert "output %1234 does not exist" in str(info.value)


def test_verify_detects_missing_edge_bad_index_unknown_op_and_duplicate_keys(graph):
    g = graph.copy()
    g.nx.remove_edge(1, 2)
    with pytest.raises(AssertionError, match="edge from %1 missing"):
        g.verify()
    g = graph.copy()
    g.nodes[4].inputs = (Ref(3, 7),)
    with pytest.raises(AssertionError, match="has no output 7"):
        g.verify()
    g = graph.copy()
    g.nodes[1].op = "frobnicate"
    with pytest.raises(AssertionError, match="unknown op frobnicate"):
        g.verify()
    g = graph.copy()
    g.nodes[11].name = g.nodes[1].name    # layers.1.norm renamed to layers.0.norm
    with pytest.raises(AssertionError, match="weight key layers.0.norm.weight also belongs to %1"):
        g.verify()
    g = graph.copy()
    g.nodes[2].inputs = ()
    with pytest.raises(AssertionError, match="linear takes 1 inputs, has 0"):
        g.verify()


def test_copy_is_independent(graph):
    g = graph.copy()
    g.nodes[1].attrs["eps"] = 0.5
    g.nodes[1].meta["plan"] = "scan"
    assert graph.nodes[1].attrs["eps"] != 0.5 and "plan" not in graph.nodes[1].meta
    assert g.dump() != graph.dump()


# -- dump and DOT --------------------------------------------------------------------------------------------

def test_dump_is_stable(graph):
    assert seqc.build_graph(MAMBA).dump() == seqc.build_graph(MAMBA).dump() == graph.dump()


def test_dump_has_one_line_per_node_with_its_location(graph):
    lines = graph.dump().splitlines()
    assert lines[0] == "model Mamba(d_model=64, n_layers=2, d_state=16, expand=2, d_conv=4, dt_rank=4) {"
    assert lines[-2] == f"  return %{graph.outputs[0].node}" and lines[-1] == "}"
    body = lines[1:-2]
    assert len(body) == len(graph.nodes)
    pattern = re.compile(r"  %(\d+) = (\w+)(?:\[.*?\])?\((.*?)\) : (.+?)  # (?:(\S+) )?(\S+\.seq):(\d+):(\d+)")
    for line, node in zip(body, graph.order()):
        m = pattern.fullmatch(line)
        assert m, line
        assert int(m.group(1)) == node.id and m.group(2) == node.op
        assert m.group(3) == ", ".join(str(r) for r in node.inputs)
        assert (m.group(5) or "") == node.name
        # standard-library files show as std/NAME.seq (never the install location), others by base name
        shown = node.span.file if node.span.file.startswith("std/") else Path(node.span.file).name
        assert (m.group(6), int(m.group(7)), int(m.group(8))) == (shown, node.span.line, node.span.column)


def _location_of(path: Path, needle: str):
    """(line, column) of `needle` in a file, found independently of the compiler."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return i, line.index(needle) + 1
    raise AssertionError(needle)


def test_dump_locations_point_at_the_source(graph):
    dump = graph.dump()
    for name, needle in [("layers.0.mixer.in_proj", "linear(h, 2 * d_inner"), ("layers.1.norm", "rmsnorm(x)"),
                         ("layers.0.mixer", "selective_ssm("), ("layers.1.mixer.out_proj", "linear(y, d_model")]:
        line, col = _location_of(BLOCK_FILE, needle)
        assert re.search(rf"# {re.escape(name)} std/mamba_block\.seq:{line}:{col}$", dump, re.M), name
    line, col = _location_of(Path(MAMBA), "input x")
    assert re.search(rf"^  %0 = input\[name=x\]\(\) : f32\[B, L, 64\]  # x mamba\.seq:{line}:{col}$", dump, re.M)
    add_line, add_col = _location_of(BLOCK_FILE, "x + mixer")
    adds = [l for l in dump.splitlines() if " = add(" in l]
    assert len(adds) == 2 and all(l.endswith(f"# std/mamba_block.seq:{add_line}:{add_col}") for l in adds)


def _dot_statements(dot: str):
    """A small structural reading of the DOT text: node declarations and edges."""
    assert dot.startswith('digraph "Mamba" {\n') and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    nodes, edges = {}, set()
    for line in dot.splitlines()[1:-1]:
        line = line.strip()
        assert line.endswith(";") or line.endswith("}"), line
        assert line.count('"') % 2 == 0, line
        if m := re.fullmatch(r'(n\d+|out) \[(.*)\];', line):
            label = re.search(r'label="((?:[^"\\]|\\.)*)"', m.group(2))
            assert label, line
            nodes[m.group(1)] = label.group(1)
        elif m := re.fullmatch(r"(n\d+) -> (n\d+|out);", line):
            edges.add((m.group(1), m.group(2)))
        else:
            assert re.fullmatch(r"(rankdir=\w+|node \[.*\]|subgraph .*\});", line) or line.startswith("subgraph"), line
    return nodes, edges


def test_to_dot_structure(graph):
    dot = graph.to_dot()
    nodes, edges = _dot_statements(dot)
    assert set(nodes) == {f"n{i}" for i in graph.nodes} | {"out"}
    assert edges == {(f"n{a}", f"n{b}") for a, b in graph.nx.edges} | {(f"n{r.node}", "out") for r in graph.outputs}
    assert nodes["n2"].startswith("%2 linear\\nlayers.0.mixer.in_proj\\nf32[B, L, 256]")
    assert "f32[B, L, 4] f32[B, L, 16] f32[B, L, 16]" in nodes["n6"]
    if importlib.util.find_spec("pydot") is not None:
        from networkx.drawing.nx_pydot import from_pydot
        import pydot
        (parsed,) = pydot.graph_from_dot_data(dot)
        g = from_pydot(parsed)
        assert {(a, b) for a, b, *_ in g.edges} == edges


def test_to_dot_shows_plans_and_fusion_regions(graph):
    g = graph.copy()
    g.nodes[8].meta.update(plan="scan", fusion="f0")
    g.nodes[9].meta.update(fusion="f0")
    nodes, _ = _dot_statements(g.to_dot())
    assert "plan=scan" in nodes["n8"] and "fusion=f0" in nodes["n9"]
    assert re.search(r'subgraph "cluster_f0" \{ label="f0"; style=dashed; n8; n9; \}', g.to_dot())
