"""The compiler's architecture as a picture, generated from the code itself.

``pipeline_dot()`` reads the live tables - the grammar file, the default pass
pipeline (``seqc.passes``), the op families (``seqc.ops``) and the backend
registry (``seqc.backend``) - and draws the path a spec takes through them as
Graphviz DOT.  ``python -m seqc.architecture [--svg OUT] [--dot OUT]`` writes
it; the README's picture (``docs/architecture.svg``) is produced this way and a
test checks that the checked-in DOT is current, so the picture cannot drift
from the code.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

STAGES = (
    # (id, label, module) in pipeline order, before the passes
    ("text", "spec text (.seq)", ""),
    ("parse", "parse: Lark grammar -> AST", "seqc/parser.py, grammar/seq.lark, seqc/ast.py"),
    ("load", "load includes", "seqc/loader.py"),
    ("elab", "elaborate: blocks, params, shapes", "seqc/analysis.py, seqc/values.py"),
    ("ir", "graph IR (networkx) + verifier", "seqc/ir.py"),
)
AFTER = (
    ("lower", "lower: Program (calls, regions, plan tables, disc programs)", "seqc/lower.py, seqc/codegen.py"),
)


def _passes() -> list[tuple[str, str]]:
    from .passes import PASSES, Pipeline
    return [(name, PASSES[name].doc) for name in Pipeline().names]


def _families() -> list[str]:
    from . import ops
    return list(ops.FAMILIES)


def _backends() -> list[str]:
    from . import backend
    return sorted(backend.backend_names())


def _node(ident: str, label: str, module: str = "", shape: str = "box") -> str:
    text = label + (f"\\n{module}" if module else "")
    return f'  {ident} [shape={shape}, label="{text}"];'


def pipeline_dot() -> str:
    """DOT source of the spec -> IR -> passes -> program -> backends pipeline."""
    out = ['digraph seqc {', '  rankdir=TB;', '  node [fontname="Helvetica", fontsize=11];',
           '  edge [color="#555555"];']
    chain = []
    for ident, label, module in STAGES:
        out.append(_node(ident, label, module, "note" if ident == "text" else "box"))
        chain.append(ident)
    out.append('  subgraph cluster_passes { label="passes (seqc/passes/, verifier after each)"; style=rounded;')
    for i, (name, doc) in enumerate(_passes()):
        ident = f"pass{i}"
        out.append(f'    {ident} [shape=box, style=filled, fillcolor="#eef3ff", label="{name}"];')
        chain.append(ident)
    out.append("    { rank=same; " + " ".join(f"pass{i};" for i in range(len(_passes()))) + " }")
    out.append("  }")
    for ident, label, module in AFTER:
        out.append(_node(ident, label, module))
        chain.append(ident)
    out += [f"  {a} -> {b};" for a, b in zip(chain, chain[1:])]
    families = ", ".join(_families())
    out.append(_node("ops", "op registry: one module per family", "seqc/ops/: " + families, "component"))
    for user in ("elab", "pass0", "lower"):
        out.append(f'  ops -> {user} [style=dashed, arrowhead=none];')
    out.append('  subgraph cluster_backends { label="backends (seqc/backend.py registry)"; style=rounded;')
    for name in _backends():
        out.append(f'    be_{name} [shape=box3d, label="{name}\\nbackends/{name}/"];')
    out.append("  }")
    out += [f"  lower -> be_{name};" for name in _backends()]
    out.append("}")
    return "\n".join(out) + "\n"


def render_svg(dot_source: str, path: str) -> None:
    if shutil.which("dot") is None:
        raise SystemExit("rendering SVG needs Graphviz's 'dot' on the PATH")
    subprocess.run(["dot", "-Tsvg", "-o", path], input=dot_source, text=True, check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m seqc.architecture", description=__doc__.splitlines()[0])
    ap.add_argument("--dot", metavar="OUT", help="write the DOT source here")
    ap.add_argument("--svg", metavar="OUT", help="render it to SVG (needs Graphviz)")
    args = ap.parse_args(argv)
    source = pipeline_dot()
    if args.dot:
        with open(args.dot, "w", encoding="utf-8") as f:
            f.write(source)
    if args.svg:
        render_svg(source, args.svg)
    if not (args.dot or args.svg):
        sys.stdout.write(source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
