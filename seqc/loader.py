"""Loading a spec: parse the main file (path or source text) and, once each,
the files it includes; ``std/NAME.seq`` names a block file shipped with seqc."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import ast
from .errors import SeqcError
from .parser import parse, parse_file
from .registry import OPS

@dataclass
class Program:
    main: ast.Module
    definitions: dict[str, ast.Definition]
    model: ast.Definition


def load(spec) -> Program:
    """Parse `spec` (a path or source text) and everything it includes."""
    if isinstance(spec, ast.Module):
        main = spec
    elif isinstance(spec, Path) or (isinstance(spec, str) and "\n" not in spec and "{" not in spec
                                    and (spec.endswith(".seq") or os.path.exists(spec))):
        main = parse_file(spec)
    else:
        main = parse(spec)
    defs: dict[str, ast.Definition] = {}
    _collect(main, defs, stack=[os.path.abspath(main.filename)], seen=set())
    models = [d for d in main.definitions if d.kind == "model"]
    if not models:
        raise SeqcError("no 'model' definition in this file", filename=main.filename, line=1, column=1)
    if len(models) > 1:
        raise SeqcError(f"more than one model in one file (first is '{models[0].name}')", models[1].span)
    return Program(main, defs, models[0])


STDLIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stdlib")


def resolve_include(path: str, including: str) -> str:
    """'std/NAME.seq' names a block file shipped with seqc; other paths are
    relative to the including file (or the working directory for source text)."""
    if path.startswith("std/"):
        return os.path.join(STDLIB, path[4:])
    base = os.path.dirname(including) if os.path.exists(including) else os.getcwd()
    return os.path.abspath(os.path.join(base, path))


def _collect(module: ast.Module, defs, stack, seen):
    """Definitions of `module` and (once each) of the files it includes."""
    for item in module.items:
        if isinstance(item, ast.Include):
            path = resolve_include(item.path, module.filename)
            if path in stack:
                raise SeqcError(f"include cycle: {' -> '.join(os.path.basename(p) for p in stack + [path])}",
                                item.span)
            if not os.path.isfile(path):
                what = "is a directory" if os.path.isdir(path) else "no such file"
                raise SeqcError(f"cannot include '{item.path}': {what}", item.span)
            if len(stack) > 16:
                raise SeqcError("includes nested more than 16 deep", item.span)
            if path not in seen:       # a file included twice (a diamond) contributes once
                seen.add(path)
                _collect(parse_file(path), defs, stack + [path], seen)
            continue
        if item.kind == "model" and len(stack) > 1:
            continue  # an included file's model is its own example, not ours
        if item.name in defs:
            raise SeqcError(f"'{item.name}' is defined twice (first at {defs[item.name].span})", item.span)
        if item.name in OPS:
            raise SeqcError(f"'{item.name}' is the name of a built-in layer", item.span)
        defs[item.name] = item
