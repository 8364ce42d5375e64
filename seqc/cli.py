"""The `seqc` command: one sub-command per verb, each on a .seq file.

Exit status: 0 success, 1 a check of results failed, 2 a user's mistake
(printed as FILE:LINE:COL: error: MESSAGE, the source line and a caret; an
error about the whole file or the command line has no position and reads
FILE: error: MESSAGE).  Warnings (FILE:LINE:COL: warning: ...) go to stderr
and do not change the exit status.

The FILE argument is always a file (``-`` reads the spec from standard
input); ``-I DIR`` adds an include search path and ``--allow-any-include``
lets ``include`` name any .seq file (see ``seqc.loader``).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from .errors import SeqcError, SeqcWarning, visible


def _params(pairs) -> dict:
    out = {}
    for p in pairs or ():
        if "=" not in p:
            raise SeqcError(f"--param expects NAME=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        if any(ch in "\n\r" for ch in v):
            raise SeqcError(f"--param {k.strip()}: the value spans several lines ({v[:40]!r}); give one "
                            f"expression on one line")
        out[k.strip()] = v.strip()
    return out


def _spec_of(args):
    """The spec named on the command line: a file, or standard input for '-'."""
    from .limits import how_to_raise, limit
    from .loader import Spec
    how = dict(include_paths=tuple(args.include or ()), allow_any_include=args.allow_any_include)
    if args.file == "-":
        most = limit("SEQC_MAX_SPEC_BYTES")
        data = sys.stdin.buffer.read(most + 1)
        if len(data) > most:
            raise SeqcError(f"spec on standard input is too large (more than {most} bytes; "
                            f"{how_to_raise('SEQC_MAX_SPEC_BYTES')})", filename="<stdin>")
        return Spec(source=data, filename="<stdin>", **how)
    return Spec(path=args.file, **how)


def _graph(args):
    from .analysis import build_graph
    return build_graph(args.file, _params(args.param))


def _refuse_overwrite(args, out, flag):
    """An output file never replaces the spec, and an existing file only with --force."""
    if out in (None, "-"):
        return
    spec = getattr(args.file, "path", None)
    if spec is not None and os.path.exists(out) and os.path.samefile(out, spec):
        raise SeqcError(f"{flag} {out} would overwrite the spec itself; choose another output file")
    if os.path.exists(out) and not getattr(args, "force", False):
        raise SeqcError(f"{flag} {out}: the file exists; pass --force to overwrite it")


def cmd_check(args) -> int:
    from .memory import estimate
    g = _graph(args)
    n_weights = sum(1 for _ in g.weight_shapes())
    print(f"{args.file}: ok: model {g.name}, {len(g.nodes)} nodes, {len(g.layers())} layers, "
          f"{n_weights} weight tensors")
    print(f"  {estimate(g, 1, 1024)}")
    return 0


def cmd_graph(args) -> int:
    from .passes import run_pipeline
    _refuse_overwrite(args, args.dot, "--dot")
    _refuse_overwrite(args, args.svg, "--svg")
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
    for flag in ("batch", "length"):
        v = getattr(args, flag, None)
        if v is not None and not 1 <= v <= 2 ** 40:
            raise SeqcError(f"--{flag} must be a positive integer (at most 2**40), got {v}")
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
    from . import __version__
    p = argparse.ArgumentParser(prog="seqc", description="A compiler for sequence models (.seq specs).")
    p.add_argument("--version", action="version", version=f"seqc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help):
        s = sub.add_parser(name, help=help, description=help)
        if not getattr(fn, "takes_spec", True):      # e.g. `seqc ops`, `seqc import`: own positionals
            s.set_defaults(fn=fn, file=None)
            return s
        s.add_argument("file", help="a .seq file ('-' reads the spec from standard input)")
        s.add_argument("--param", "-p", action="append", metavar="NAME=VALUE",
                       help="override a top-level parameter (repeatable)")
        s.add_argument("-I", dest="include", action="append", metavar="DIR",
                       help="also resolve 'include' against DIR (repeatable)")
        s.add_argument("--allow-any-include", action="store_true",
                       help="let 'include' name any .seq file (absolute paths, '..' out of the include roots)")
        s.set_defaults(fn=fn)
        return s

    add("check", cmd_check, "parse, validate and shape-check a spec")
    g = add("graph", cmd_graph, "print the graph IR (and optionally DOT / SVG)")
    g.add_argument("--dot", metavar="OUT", help="write a Graphviz DOT file of the planned IR, with plans and "
                   "fusion regions ('-' for stdout)")
    g.add_argument("--svg", metavar="OUT", help="render that DOT to SVG with Graphviz's dot")
    g.add_argument("--planned", action="store_true", help="show the IR after the pass pipeline")
    g.add_argument("--force", action="store_true", help="overwrite existing --dot / --svg files")
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
    file = args.file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", SeqcWarning)
            warnings.showwarning = _show_warning
            if getattr(args.fn, "takes_spec", True):
                args.file = _spec_of(args)
            return args.fn(args) or 0
    except SeqcError as e:
        if e.filename is None and file is not None:   # no position: FILE: error: ..., no invented line
            e = SeqcError(e.message, filename="<stdin>" if file == "-" else file, notes=e.notes)
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


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """seqc's own warnings as FILE:LINE:COL: warning: ...; others as Python prints them."""
    if isinstance(message, SeqcWarning):
        print(visible(str(message)), file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line).rstrip(), file=sys.stderr)


def _register_more():
    """Import the modules whose commands exist (later stages register theirs)."""
    from . import commands  # noqa: F401


if __name__ == "__main__":
    sys.exit(main())
