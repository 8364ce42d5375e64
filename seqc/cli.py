"""The `seqc` command: one sub-command per verb, each on a .seq file.

Exit status: 0 success, 1 a check of results failed, 2 a user's mistake
(printed as FILE:LINE:COL: error: MESSAGE, the source line and a caret).
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import SeqcError


def _params(pairs) -> dict:
    out = {}
    for p in pairs or ():
        if "=" not in p:
            raise SeqcError(f"--param expects NAME=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _graph(args):
    from .analysis import build_graph
    return build_graph(args.file, _params(args.param))


def cmd_check(args) -> int:
    g = _graph(args)
    n_weights = sum(1 for _ in g.weight_shapes())
    print(f"{args.file}: ok: model {g.name}, {len(g.nodes)} nodes, {len(g.layers())} layers, "
          f"{n_weights} weight tensors")
    return 0


def cmd_graph(args) -> int:
    from .passes import run_pipeline
    g = _graph(args)
    planned = run_pipeline(g, _context(args)) if (args.planned or args.dot or args.svg) else g
    if args.planned:
        g = planned
    if args.dot:   # the DOT export always carries the plan and fusion annotations
        _write(args.dot, planned.to_dot())
    if args.svg:
        import shutil
        import subprocess
        if shutil.which("dot") is None:
            raise SeqcError("--svg needs Graphviz's 'dot' on the PATH (install graphviz)")
        done = subprocess.run(["dot", "-Tsvg", "-o", args.svg], input=planned.to_dot(), text=True,
                              capture_output=True)
        if done.returncode:
            raise SeqcError(f"dot could not write {args.svg}: {done.stderr.strip()}")
    if not args.dot or args.dot != "-":
        sys.stdout.write(g.dump())
    return 0


def _context(args):
    from .passes import PlanContext
    return PlanContext(batch=getattr(args, "batch", 1) or 1, length=getattr(args, "length", 1024) or 1024,
                       backend=getattr(args, "backend", "torch") or "torch")


def _write(path, text):
    if path == "-":
        sys.stdout.write(text)
        return
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise SeqcError(f"cannot write {path}: {e.strerror}") from None


COMMANDS = {}


def command(name, help):
    def deco(fn):
        COMMANDS[name] = (fn, help)
        return fn
    return deco


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqc", description="A compiler for sequence models (.seq specs).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help):
        s = sub.add_parser(name, help=help, description=help)
        s.add_argument("file", help="a .seq file")
        s.add_argument("--param", "-p", action="append", metavar="NAME=VALUE",
                       help="override a top-level parameter (repeatable)")
        s.set_defaults(fn=fn)
        return s

    add("check", cmd_check, "parse, validate and shape-check a spec")
    g = add("graph", cmd_graph, "print the graph IR (and optionally DOT / SVG)")
    g.add_argument("--dot", metavar="OUT", help="write a Graphviz DOT file of the planned IR, with plans and "
                   "fusion regions ('-' for stdout)")
    g.add_argument("--svg", metavar="OUT", help="render that DOT to SVG with Graphviz's dot")
    g.add_argument("--planned", action="store_true", help="show the IR after the pass pipeline")
    g.add_argument("--length", type=int, default=1024)
    g.add_argument("--batch", type=int, default=1)
    for name, (fn, help) in COMMANDS.items():
        s = add(name, fn, help)
        for flag, kw in getattr(fn, "options", []):
            s.add_argument(*flag, **kw)
    return p


def main(argv=None) -> int:
    _register_more()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args) or 0
    except SeqcError as e:
        if e.line is None and getattr(args, "file", None):   # still FILE:LINE:COL, as the contract says
            e = SeqcError(e.message, filename=e.filename or args.file, line=1, column=1)
        print(e.render(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a compiler bug: say so plainly, no traceback unless asked
        if os.environ.get("SEQC_DEBUG"):
            raise
        print(f"seqc: internal error: {type(e).__name__}: {e} (set SEQC_DEBUG=1 for a traceback)", file=sys.stderr)
        return 3


def _register_more():
    """Import the modules whose commands exist (later stages register theirs)."""
    from . import commands  # noqa: F401


if __name__ == "__main__":
    sys.exit(main())
