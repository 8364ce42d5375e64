"""Loading a spec: where its text comes from (a file or source text), parsing
it and, once each, the files it includes.

Path or text (``Spec`` and ``as_spec``)
  ``Spec(path=...)`` / ``Spec(source=...)`` say it explicitly; a
  ``pathlib.Path`` (any ``os.PathLike``) is always a file.  A plain ``str`` is
  source text when it contains a newline or ``{``; otherwise it is a file path
  when it ends in ``.seq``; a ``str`` naming another existing file is still
  read as that file, with a ``DeprecationWarning`` (pass a ``Path`` or
  ``path=``); anything else is source text.

Include resolution (``resolve_include``)
  ``include "std/NAME.seq"`` names a block file shipped with seqc;
  ``include "REL.seq"`` resolves against the including file's directory (the
  working directory for source text), then each explicit search path
  (``-I DIR`` / ``include_paths=``), first existing match wins.  The resolved
  file (symlinks followed) must lie inside one of these roots: an
  absolute path or a ``..`` that leaves every root is refused unless the user
  opts in (``--allow-any-include`` / ``allow_any_include=True``).  Only
  ``.seq`` files can be included, and nothing is read before these checks, so
  an include can never make seqc read or print another file.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import ast
from .errors import SeqcError
from .parser import is_spec_name, parse, parse_file
from .registry import OPS


@dataclass(frozen=True)
class Spec:
    """A spec to load: exactly one of ``path`` (a file) or ``source`` (its text),
    plus the include rules.  ``str(spec)`` is the name errors use."""

    path: str | os.PathLike | None = None
    source: str | bytes | None = None
    filename: str | None = None          # the name of source text in errors (default "<string>")
    include_paths: tuple = field(default=())
    allow_any_include: bool = False

    def __post_init__(self):
        if (self.path is None) == (self.source is None):
            raise SeqcError("give exactly one of path= (a .seq file) or source= (its text)")
        if self.path is not None and not isinstance(self.path, (str, os.PathLike)):
            raise SeqcError(f"path= must be a str or os.PathLike, not {type(self.path).__name__}")
        if self.source is not None and not isinstance(self.source, (str, bytes)):
            raise SeqcError(f"source= must be a str, not {type(self.source).__name__}")
        paths = self.include_paths
        if isinstance(paths, (str, os.PathLike)):
            paths = (paths,)
        try:
            paths = tuple(os.fspath(p) for p in paths or ())
        except TypeError:
            raise SeqcError("include_paths= must be a list of directories") from None
        object.__setattr__(self, "include_paths", paths)

    @property
    def name(self) -> str:
        return os.fspath(self.path) if self.path is not None else (self.filename or "<string>")

    def __str__(self) -> str:
        return self.name

    def parse(self) -> ast.Module:
        if self.path is not None:
            return parse_file(self.path)
        return parse(self.source, self.name)


def as_spec(spec, *, path=None, source=None, include_paths=None, allow_any_include=None) -> Spec:
    """The ``Spec`` meant by a positional `spec` and/or the keyword forms (the rule
    in this module's docstring)."""
    given = [x for x in (spec, path, source) if x is not None]
    if len(given) != 1:
        raise SeqcError("give one spec: a path (pathlib.Path or path=...) or source text (source=...)")
    extra = {}
    if include_paths is not None:
        extra["include_paths"] = include_paths
    if allow_any_include is not None:
        extra["allow_any_include"] = bool(allow_any_include)
    if path is not None:
        return Spec(path=path, **extra)
    if source is not None:
        return Spec(source=source, **extra)
    if isinstance(spec, Spec):
        if extra:
            from dataclasses import replace
            return replace(spec, **extra)
        return spec
    if isinstance(spec, os.PathLike):
        return Spec(path=spec, **extra)
    if isinstance(spec, bytes):
        return Spec(source=spec, **extra)
    if not isinstance(spec, str):
        raise SeqcError(f"a spec is a path (pathlib.Path) or source text (str), not {type(spec).__name__}")
    if "\n" in spec or "{" in spec:
        return Spec(source=spec, **extra)
    if spec.endswith(".seq"):
        return Spec(path=spec, **extra)
    if os.path.isfile(spec):
        warnings.warn(f"reading the file {spec!r} because the string names one; a str that does not end in "
                      f"'.seq' will be read as source text in a later version -- pass pathlib.Path({spec!r}) "
                      f"or path={spec!r}", DeprecationWarning, stacklevel=3)
        return Spec(path=spec, **extra)
    return Spec(source=spec, **extra)


@dataclass
class Program:
    main: ast.Module
    definitions: dict[str, ast.Definition]
    model: ast.Definition


def load(spec, **how) -> Program:
    """Parse `spec` (see ``as_spec``: a path, source text or a ``Spec``) and everything it includes."""
    if isinstance(spec, ast.Module):   # already parsed: includes resolve as for source text
        main, rules = spec, as_spec(None, source="-", **how)
        first = spec.filename if os.path.isfile(spec.filename) else None
    else:
        rules = as_spec(spec, **how)
        main, first = rules.parse(), rules.path
    defs: dict[str, ast.Definition] = {}
    start = os.path.realpath(os.fspath(first)) if first is not None else main.filename
    _collect(main, defs, stack=[start], seen=set(), rules=rules, base=_base_dir(first))
    models = [d for d in main.definitions if d.kind == "model"]
    if not models:
        raise SeqcError("no 'model' definition in this file", filename=main.filename)
    if len(models) > 1:
        raise SeqcError(f"more than one model in one file (first is '{models[0].name}')", models[1].span)
    return Program(main, defs, models[0])


STDLIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stdlib")


def _base_dir(path) -> str:
    """The directory relative includes start from: the file's, or the working directory for text."""
    if path is None:
        return os.getcwd()
    return os.path.dirname(os.path.abspath(os.fspath(path)))


def _inside(path: str, root: str) -> bool:
    root = os.path.realpath(root)
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:   # different drives
        return False


def resolve_include(path: str, base: str, rules: Spec | None = None, span=None) -> str:
    """The file an ``include`` names (rule in the module docstring); a refused or
    missing include is a located SeqcError.  Nothing is opened here."""
    rules = rules or Spec(source="-")
    if not path.endswith(".seq"):
        raise SeqcError(f"cannot include '{path}': only .seq files can be included", span)
    if "\x00" in path:
        raise SeqcError("cannot include a path containing a NUL character", span)
    if path.startswith("std/"):
        found = os.path.realpath(os.path.join(STDLIB, path[4:]))
        if not _inside(found, STDLIB):
            raise SeqcError(f"cannot include '{path}': it leaves seqc's standard library", span)
        if not os.path.isfile(found):
            raise SeqcError(f"cannot include '{path}': seqc's standard library has no such file "
                            f"(it has {', '.join(sorted(f for f in os.listdir(STDLIB) if f.endswith('.seq')))})",
                            span)
        return found
    roots = [base] + [os.path.abspath(p) for p in rules.include_paths]
    hint = "pass its directory with -I DIR (include_paths=[...]) or allow any path with --allow-any-include " \
           "(allow_any_include=True)"
    leaving = None
    for root in roots:
        found = os.path.realpath(os.path.join(root, path))
        if not rules.allow_any_include and not any(_inside(found, r) for r in roots):
            leaving = leaving or found
            continue
        if os.path.exists(found):
            if not os.path.isfile(found):
                raise SeqcError(f"cannot include '{path}': not a regular file", span)
            return found
    if leaving is not None:
        where = "an absolute path" if os.path.isabs(path) else "a path that leaves the including file's directory"
        raise SeqcError(f"cannot include '{path}': {where} is outside the include roots; {hint}", span)
    raise SeqcError(f"cannot include '{path}': no such file (searched {', '.join(roots)})", span)


def _collect(module: ast.Module, defs, stack, seen, rules: Spec, base: str):
    """Definitions of `module` and (once each) of the files it includes."""
    for item in module.items:
        if isinstance(item, ast.Include):
            path = resolve_include(item.path, base, rules, item.span)
            if path in stack:
                raise SeqcError(f"include cycle: {' -> '.join(os.path.basename(p) for p in stack + [path])}",
                                item.span)
            if len(stack) > 16:
                raise SeqcError("includes nested more than 16 deep", item.span)
            if path not in seen:       # a file included twice (a diamond) contributes once
                seen.add(path)
                module = parse_file(path, name=display_name(path))
                _collect(module, defs, stack + [path], seen, rules, os.path.dirname(path))
            continue
        if item.kind == "model" and len(stack) > 1:
            continue  # an included file's model is its own example, not ours
        if item.name in defs:
            raise SeqcError(f"'{item.name}' is defined twice (first at {defs[item.name].span})", item.span)
        if item.name in OPS:
            raise SeqcError(f"'{item.name}' is the name of a built-in layer", item.span)
        defs[item.name] = item


def display_name(filename: str) -> str:
    """How a file is named in errors, dumps and reports: ``std/NAME.seq`` for a
    file of seqc's standard library (never its install location), else `filename`."""
    try:
        real = os.path.realpath(filename)
    except (TypeError, ValueError):
        return filename
    std = os.path.realpath(STDLIB)
    if filename and not filename.startswith("<") and _inside(real, std):
        return "std/" + os.path.relpath(real, std).replace(os.sep, "/")
    return filename
