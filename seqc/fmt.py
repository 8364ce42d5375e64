"""AST -> canonical .seq text.

``format_module`` prints a parsed module back as source in one canonical
layout: includes first as written, one blank line between items, two-space
indentation, spaces around ``=`` and binary operators, and only the
parentheses the grammar needs.  ``parse(format_module(m)) == m`` for every
module the parser produces, and formatting is idempotent.

``format_source(text)`` formats source text and keeps its comments: the parser
drops them, so they are read from the text with their line numbers and put
back next to the item or statement they were written beside (a comment on its
own line stays on its own line before the next statement, or before the
closing brace; a trailing comment stays at the end of its statement's last
line; several trailing comments inside one wrapped statement go on their own
lines before it).
"""
from __future__ import annotations

import math
import re

from . import ast

KEYWORDS = frozenset({"model", "block", "include", "input", "return", "repeat", "as", "true", "false"})
WIDTH = 100          # a statement longer than this breaks its outermost call's arguments
INDENT = "  "

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# Binding strength in grammar/seq.lark: sum < product < unary minus < power < atom.
_SUM, _PRODUCT, _UNARY, _POWER, _ATOM = 1, 2, 3, 4, 5
_BINARY = {"+": _SUM, "-": _SUM, "*": _PRODUCT, "/": _PRODUCT, "//": _PRODUCT, "%": _PRODUCT, "**": _POWER}


def format_source(text, filename: str = "<string>", *, quote: bool = True) -> str:
    """The canonical text of source `text` (str or UTF-8 bytes), comments kept."""
    from .parser import parse
    module = parse(text, filename, quote=quote)
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")
    return format_module(module, comments(text), _code_lines(text))


def _split(line: str) -> tuple[str, str | None]:
    """(code, comment or None) of one source line; '#' inside a string is not a comment."""
    in_string = False
    for k, ch in enumerate(line):
        if ch == '"':
            in_string = not in_string
        elif ch == "#" and not in_string:
            return line[:k], line[k:].rstrip()
    return line, None


def comments(text: str) -> list[tuple[int, str, bool]]:
    """(line, '# text', alone-on-its-line) for every comment of `text`."""
    out = []
    for no, line in enumerate(text.split("\n"), 1):
        code, comment = _split(line)
        if comment is not None:
            out.append((no, comment, not code.strip()))
    return out


def _code_lines(text: str) -> list[str]:
    return [_split(line)[0] for line in text.split("\n")]


class _Comments:
    """Comments not yet placed, consumed in line order; `code` (the source lines
    without comments) tells where a span's last token really is -- the parser's
    spans run on over the newlines (and comment lines) that end a statement."""

    def __init__(self, items, code):
        self.items = sorted(items)
        self.code = code

    def last_line(self, span) -> int:
        for line in range(span.end_line or span.line, span.line - 1, -1):
            part = self.code[line - 1] if line - 1 < len(self.code) else ""
            if line == span.end_line and span.end_column:
                part = part[:span.end_column - 1]
            if part.strip():
                return line
        return span.line

    def before(self, line: int) -> list[str]:
        """Comments above `line`, in order."""
        out = []
        while self.items and self.items[0][0] < line:
            out.append(self.items.pop(0)[1])
        return out

    def within(self, first: int, last: int) -> tuple[list[str], list[str]]:
        """(own-line comments, trailing comments) on lines first..last."""
        alone, trailing = [], []
        while self.items and self.items[0][0] <= last:
            line, txt, own = self.items.pop(0)
            (alone if own or line < first else trailing).append(txt)
        return alone, trailing


def format_module(module: ast.Module, comments: list | None = None, code: list | None = None) -> str:
    """The canonical text of `module` (ends with one newline); `comments` as
    given by ``comments(text)`` are put back where they were (`code`: the
    source's lines without comments, as ``format_source`` passes them)."""
    if comments:
        return _with_comments(module, _Comments(comments, code or []))
    chunks = [_item(item) for item in module.items]
    out = []
    for k, chunk in enumerate(chunks):
        # consecutive includes stay together; everything else is set apart by a blank line
        if k and not (isinstance(module.items[k], ast.Include) and isinstance(module.items[k - 1], ast.Include)):
            out.append("")
        out.append(chunk)
    return "\n".join(out) + "\n" if out else ""


def format_expr(e: ast.Expr) -> str:
    """One expression on one line, minimally parenthesised."""
    return _expr(e, 0)


def _with_comments(module: ast.Module, cs: _Comments) -> str:
    out = []
    for k, item in enumerate(module.items):
        if k and not (isinstance(item, ast.Include) and isinstance(module.items[k - 1], ast.Include)):
            out.append("")
        out += cs.before(item.span.line)
        if isinstance(item, ast.Include):
            alone, trailing = cs.within(item.span.line, cs.last_line(item.span))
            out += alone
            out.append(_trail(f"include {_string(item.path)}", trailing))
            continue
        out.append(_definition_with_comments(item, cs))
    rest = cs.before(10 ** 9)
    if rest:
        if out:
            out.append("")
        out += rest
    return "\n".join(out) + "\n" if out else ""


def _trail(text: str, trailing: list[str]) -> str:
    return text + "".join(f"  {t}" for t in trailing)


def _definition_with_comments(item: ast.Definition, cs: _Comments) -> str:
    if item.kind not in ("model", "block"):
        raise ValueError(f"definition kind must be 'model' or 'block', got {item.kind!r}")
    params = ", ".join(_param(p) for p in item.params)
    head = item.span.line
    close = cs.last_line(item.span)                       # the line of '}'
    body_start = item.body[0].span.line if item.body else close
    _, trailing = cs.within(head, head)                   # beside the header's first line
    lines = [_trail(f"{item.kind} {_name(item.name)}({params}) {{", trailing)]
    # a header over several lines (long parameter lists): its comments follow it, indented
    lines += [INDENT + c for c in cs.before(body_start)]
    for s in item.body:
        lines += [INDENT + c for c in cs.before(s.span.line)]
        alone, trailing = cs.within(s.span.line, cs.last_line(s.span))
        if len(trailing) > 1:
            alone, trailing = alone + trailing, []
        lines += [INDENT + c for c in alone]
        lines.append(INDENT + _trail(_stmt(s), trailing))
    lines += [INDENT + c for c in cs.before(close)]
    alone, trailing = cs.within(close, close)
    lines += [INDENT + c for c in alone]
    lines.append(_trail("}", trailing))
    return "\n".join(lines)


# -- items and statements -------------------------------------------------------------------

def _item(item) -> str:
    if isinstance(item, ast.Include):
        return f"include {_string(item.path)}"
    if not isinstance(item, ast.Definition):
        raise TypeError(f"not a module item: {item!r}")
    if item.kind not in ("model", "block"):
        raise ValueError(f"definition kind must be 'model' or 'block', got {item.kind!r}")
    params = ", ".join(_param(p) for p in item.params)
    lines = [f"{item.kind} {_name(item.name)}({params}) {{"]
    lines += [INDENT + _stmt(s) for s in item.body]
    lines.append("}")
    return "\n".join(lines)


def _param(p: ast.Param) -> str:
    return _name(p.name) if p.default is None else f"{_name(p.name)} = {_expr(p.default, 0)}"


def _stmt(s) -> str:
    if isinstance(s, ast.InputDecl):
        if not s.dims:
            raise ValueError(f"input '{s.name}' has no dimensions")
        dims = ", ".join(_expr(d, 0) for d in s.dims)
        return f"input {_name(s.name)}: [{dims}]" + (f" {_name(s.dtype)}" if s.dtype is not None else "")
    if isinstance(s, ast.Assign):
        if not s.targets:
            raise ValueError("assignment without targets")
        head = ", ".join(_name(t) for t in s.targets) + " = "
        if s.repeat is not None:
            head += f"repeat({_expr(s.repeat, 0)}) "
        tail = f" as {_name(s.alias)}" if s.alias is not None else ""
        return _wrapped(head, s.value, tail)
    if isinstance(s, ast.Return):
        if not s.values:
            raise ValueError("return without values")
        if len(s.values) == 1:
            return _wrapped("return ", s.values[0], "")
        return "return " + ", ".join(_expr(v, 0) for v in s.values)
    raise TypeError(f"not a statement: {s!r}")


def _wrapped(head: str, value, tail: str) -> str:
    """`head value tail` on one line, or, when too long and `value` is a call, its
    arguments filled greedily onto lines aligned after the opening parenthesis."""
    flat = head + _expr(value, 0) + tail
    if len(INDENT + flat) <= WIDTH or not isinstance(value, ast.Call):
        return flat
    args = _call_args(value)
    if len(args) < 2:
        return flat
    opening = head + _name(value.func) + "("
    pad = " " * len(opening)
    lines, cur = [], opening
    for k, a in enumerate(args):
        piece = a + ("," if k < len(args) - 1 else ")")
        if cur not in (opening, pad) and len(INDENT + cur) + 1 + len(piece) > WIDTH:
            lines.append(cur)
            cur = pad
        cur += ("" if cur in (opening, pad) else " ") + piece
    lines.append(cur + tail)
    return ("\n" + INDENT).join(lines)


# -- expressions ----------------------------------------------------------------------------

def _prec(e) -> int:
    if isinstance(e, ast.BinOp):
        return _BINARY[e.op]
    if isinstance(e, ast.Neg):
        return _UNARY
    if isinstance(e, ast.Number) and not isinstance(e.value, bool) and e.value < 0:
        return _UNARY  # printed with a leading minus (the parser itself never makes one)
    return _ATOM


def _expr(e, need: int) -> str:
    """Text of `e` where the grammar needs at least binding strength `need`."""
    text = _bare(e)
    return f"({text})" if _prec(e) < need else text


def _bare(e) -> str:
    if isinstance(e, ast.BinOp):
        if e.op not in _BINARY:
            raise ValueError(f"unknown operator {e.op!r}")
        p = _BINARY[e.op]
        if e.op == "**":  # right-associative: atom ** unary
            left, right = _expr(e.left, _ATOM), _expr(e.right, _UNARY)
        else:             # left-associative: level op next-level
            left, right = _expr(e.left, p), _expr(e.right, p + 1)
        return f"{left} {e.op} {right}"
    if isinstance(e, ast.Neg):
        return "-" + _expr(e.operand, _UNARY)
    if isinstance(e, ast.Number):
        return _number(e.value)
    if isinstance(e, ast.String):
        return _string(e.value)
    if isinstance(e, ast.Bool):
        return "true" if e.value else "false"
    if isinstance(e, ast.Name):
        return _name(e.id)
    if isinstance(e, ast.ListExpr):
        return "[" + ", ".join(_expr(x, 0) for x in e.items) + "]"
    if isinstance(e, ast.Call):
        return f"{_name(e.func)}(" + ", ".join(_call_args(e)) + ")"
    raise TypeError(f"not an expression: {e!r}")


def _call_args(c: ast.Call) -> list[str]:
    return [_expr(a, 0) for a in c.args] + [f"{_name(k.name)} = {_expr(k.value, 0)}" for k in c.kwargs]


def _number(v) -> str:
    if isinstance(v, bool):
        raise ValueError(f"a number cannot be a boolean: {v!r}")
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot write {v!r} as a .seq number")
        return repr(v)
    if isinstance(v, int):
        return str(v)
    raise TypeError(f"not a number: {v!r}")


def _string(s: str) -> str:
    if any(ch in '"\\' or (ord(ch) < 32 and ch != "\t") for ch in s):
        raise ValueError(f"cannot write {s!r} as a .seq string (no quotes, backslashes or control characters)")
    return f'"{s}"'


def _name(n: str) -> str:
    if not isinstance(n, str) or not _NAME.match(n) or n in KEYWORDS:
        raise ValueError(f"{n!r} is not a valid name")
    return n
