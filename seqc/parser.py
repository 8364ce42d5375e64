"""Text -> AST: the Lark LALR parser over grammar/seq.lark, a post-lexer for
newlines, a transformer to the dataclasses of ``seqc.ast`` and the translation
of Lark's errors into located ``SeqcError``s written in plain words."""
from __future__ import annotations

import functools
import os
import re
import stat
import threading
from importlib import resources

import lark
from lark import Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from . import ast
from .cache import Recent, cache_root, text_digest
from .errors import SeqcError, Span, forget_source, remember_source
from .limits import how_to_raise, limit

MAX_NESTING = 64          # brackets deep
MAX_INT = 2 ** 62         # integer literals beyond this are refused

_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "_NL": "end of line",
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'", "RBRACE": "'}'",
    "COMMA": "','", "COLON": "':'", "EQUAL": "'='", "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'",
    "SLASH": "'/'", "PERCENT": "'%'", "__ANON_0": "'//'", "$END": "end of file",
}


def _word(terminal: str, parser: lark.Lark) -> str:
    if terminal in _WORDS:
        return _WORDS[terminal]
    try:
        pattern = parser.get_terminal(terminal).pattern
    except KeyError:
        return terminal.lower()
    if isinstance(pattern, lark.lexer.PatternStr):
        return f"'{pattern.value}'"
    return terminal.lower()


class _Newlines:
    """Post-lexer: drop newlines inside brackets and repeated ones, make sure a
    statement before '}' and the last line end with a newline."""

    always_accept = ("_NL",)
    open: list = []  # brackets not yet closed in the current parse (read by _syntax_error)

    def process(self, stream):
        depth = 0
        prev = None
        self.open = []
        for tok in stream:
            kind = tok.type
            if kind == "_NL":
                if depth > 0 or prev is None or prev.type in ("_NL", "LBRACE"):
                    continue
            elif kind in ("LPAR", "LSQB"):
                depth += 1
                self.open.append(tok)
                if depth > MAX_NESTING:
                    raise _Located(f"brackets nested more than {MAX_NESTING} deep", tok)
            elif kind in ("RPAR", "RSQB"):
                depth = max(0, depth - 1)
                if self.open:
                    self.open.pop()
            elif kind == "RBRACE" and prev is not None and prev.type not in ("_NL", "LBRACE"):
                yield Token.new_borrow_pos("_NL", "\n", tok)
            yield tok
            prev = tok
        if prev is not None and prev.type != "_NL" and depth == 0:  # inside brackets: end of file
            yield Token("_NL", "\n", line=prev.end_line, column=prev.end_column)


class _Located(Exception):
    def __init__(self, message, tok):
        super().__init__(message)
        self.message, self.tok = message, tok


_LOCAL = threading.local()   # one parser (and post-lexer, which keeps its bracket stack) per thread


@functools.lru_cache(maxsize=None)
def _grammar() -> str:
    return resources.files("seqc.grammar").joinpath("seq.lark").read_text()


def _parser() -> lark.Lark:
    if not hasattr(_LOCAL, "parser"):
        _LOCAL.postlex = _Newlines()
        _LOCAL.parser = lark.Lark(_grammar(), parser="lalr", lexer="basic", propagate_positions=True,
                                  postlex=_LOCAL.postlex, maybe_placeholders=True, cache=_grammar_cache())
    return _LOCAL.parser


def _grammar_cache():
    """Where lark keeps its analysis of the grammar (a third of a cold ``import`` + compile):
    a file in seqc's cache directory, or False when that cannot be created.  lark checks
    the file against a hash of the grammar, its options and lark's version, and rebuilds
    (and rewrites) it when it does not match or does not load."""
    folder = os.path.join(cache_root(), "parser")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return False
    if not os.access(folder, os.W_OK):
        return False
    return os.path.join(folder, "seq.lark.cache")


def _span(file, meta) -> Span:
    return Span(file, meta.line, meta.column, meta.end_line, meta.end_column)


def _tspan(file, tok: Token) -> Span:
    return Span(file, tok.line, tok.column, tok.end_line, tok.end_column)


@v_args(meta=True)
class _ToAst(Transformer):
    def __init__(self, filename):
        super().__init__()
        self.f = filename

    def start(self, meta, items):
        return ast.Module(tuple(items), self.f)

    def include(self, meta, c):
        return ast.Include(c[0][1:-1], _span(self.f, meta))

    def _definition(self, kind, meta, c):
        name, params, *body = c
        return ast.Definition(kind, str(name), tuple(params or ()), tuple(body), _span(self.f, meta))

    def model(self, meta, c):
        return self._definition("model", meta, c)

    def block(self, meta, c):
        return self._definition("block", meta, c)

    def params(self, meta, c):
        return tuple(c)

    def param(self, meta, c):
        return ast.Param(str(c[0]), c[1], _span(self.f, meta))

    def input_decl(self, meta, c):
        name, dims, dtype = c
        return ast.InputDecl(str(name), dims, str(dtype) if dtype else None, _span(self.f, meta))

    def dims(self, meta, c):
        return tuple(c)

    def assign(self, meta, c):
        targets, rep, value, alias = c
        return ast.Assign(targets, value, alias, rep, _span(self.f, meta))

    def targets(self, meta, c):
        return tuple(str(t) for t in c)

    def repeat(self, meta, c):
        return c[0]

    def alias(self, meta, c):
        return str(c[0])

    def return_stmt(self, meta, c):
        return ast.Return(tuple(c), _span(self.f, meta))

    def _bin(op):
        def build(self, meta, c):
            return ast.BinOp(op, c[0], c[1], _span(self.f, meta))
        return build

    add, sub, mul, div = _bin("+"), _bin("-"), _bin("*"), _bin("/")
    floordiv, mod, pow = _bin("//"), _bin("%"), _bin("**")

    def neg(self, meta, c):
        return ast.Neg(c[0], _span(self.f, meta))

    def number(self, meta, c):
        tok = c[0]
        text = str(tok)
        if any(ch in text for ch in ".eE"):
            value = float(text)
            if value in (float("inf"),):
                raise _Located(f"number {text[:40]} is too large", tok)
        else:
            if len(text) > 19 or int(text) > MAX_INT:
                raise _Located(f"number {text[:40]}{'...' if len(text) > 40 else ''} is too large "
                               f"(at most {MAX_INT})", tok)
            value = int(text)
        return ast.Number(value, _tspan(self.f, tok))

    def string(self, meta, c):
        return ast.String(str(c[0])[1:-1], _tspan(self.f, c[0]))

    def true(self, meta, c):
        return ast.Bool(True, _span(self.f, meta))

    def false(self, meta, c):
        return ast.Bool(False, _span(self.f, meta))

    def name(self, meta, c):
        return ast.Name(str(c[0]), _tspan(self.f, c[0]))

    def list(self, meta, c):
        return ast.ListExpr(tuple(x for x in c if x is not None), _span(self.f, meta))

    def call(self, meta, c):
        func, *rest = c
        args, kwargs = [], []
        for a in rest:
            if a is None:
                continue
            if isinstance(a, ast.Keyword):
                kwargs.append(a)
            elif kwargs:
                raise SeqcError("positional argument after a keyword argument", a.span)
            else:
                args.append(a)
        seen = set()
        for k in kwargs:
            if k.name in seen:
                raise SeqcError(f"keyword argument '{k.name}' given twice", k.span)
            seen.add(k.name)
        return ast.Call(str(func), tuple(args), tuple(kwargs), _span(self.f, meta))

    def kwarg(self, meta, c):
        return ast.Keyword(str(c[0]), c[1], _span(self.f, meta))


def _check_text(source, filename) -> str:
    if isinstance(source, (bytes, bytearray)):
        try:
            source = bytes(source).decode("utf-8")
        except UnicodeDecodeError as e:
            line = bytes(source)[:e.start].count(b"\n") + 1
            forget_source(filename)
            raise SeqcError("file is not UTF-8 text (it looks binary)", filename=filename, line=line, column=1)
    most = limit("SEQC_MAX_SPEC_BYTES")
    if len(source) > most:
        forget_source(filename)
        raise SeqcError(f"spec is too large ({len(source)} characters; at most {most}; "
                        f"{how_to_raise('SEQC_MAX_SPEC_BYTES')})", filename=filename)
    remember_source(filename, source)
    for i, line in enumerate(source.splitlines(), 1):
        bad = next((j for j, ch in enumerate(line) if ch == "\x00" or (ord(ch) < 32 and ch not in "\t\r\f")), None)
        if bad is not None:
            raise SeqcError(f"unexpected control character {line[bad]!r} (is this a binary file?)",
                            filename=filename, line=i, column=bad + 1)
    if not source.strip() or all(not l.strip() or l.lstrip().startswith("#") for l in source.splitlines()):
        raise SeqcError("empty file: expected a 'model' or 'block' definition", filename=filename, line=1, column=1)
    return source


def parse(source, filename: str = "<string>", *, quote: bool = True) -> ast.Module:
    """Parse the text of one .seq file into an ``ast.Module``.

    ``quote=False`` (files whose name does not end in ``.seq``): an error says
    where parsing failed but never quotes the text, and the text is not kept
    for carets -- so pointing seqc at a file that is not a spec cannot print
    its bytes."""
    if not quote:
        try:
            return _parse(source, filename)
        except SeqcError as e:
            forget_source(filename)
            raise SeqcError("not a .seq spec: it does not parse (its text is not shown because the file name "
                            "does not end in '.seq')", filename=filename, line=e.line, column=e.column) from None
        finally:
            forget_source(filename)
    return _parse(source, filename)


_ASTS = Recent(64)          # the ASTs (immutable) of the most recent (file name, text) pairs


def _parse(source, filename: str) -> ast.Module:
    source = _check_text(source, filename)     # also remembers it, for error carets
    key = (filename, text_digest(source))
    module = _ASTS.get(key)
    if module is None:
        module = _parse_new(source, filename)
        _ASTS.put(key, module)
    return module


def _parse_new(source, filename: str) -> ast.Module:
    parser = _parser()
    import sys
    if sys.getrecursionlimit() < 20000:
        sys.setrecursionlimit(20000)  # long left-recursive expressions make deep trees
    try:
        tree = parser.parse(source)
        return _ToAst(filename).transform(tree)
    except _Located as e:
        raise SeqcError(e.message, _tspan(filename, e.tok)) from None
    except VisitError as e:
        inner = e.orig_exc
        if isinstance(inner, _Located):
            raise SeqcError(inner.message, _tspan(filename, inner.tok)) from None
        if isinstance(inner, SeqcError):
            raise inner from None
        if isinstance(inner, RecursionError):
            raise SeqcError("expression nested too deeply", filename=filename, line=1, column=1) from None
        raise
    except UnexpectedInput as e:
        raise _syntax_error(e, source, filename, parser) from None
    except RecursionError:
        raise SeqcError("expression nested too deeply", filename=filename, line=1, column=1) from None


def _syntax_error(e: UnexpectedInput, source: str, filename: str, parser) -> SeqcError:
    line, col = getattr(e, "line", 1), getattr(e, "column", 1)
    if isinstance(e, UnexpectedCharacters):
        ch = source[e.pos_in_stream] if e.pos_in_stream < len(source) else "?"
        msg = f"unexpected character {ch!r}"
        if ch == "'":
            msg += " (strings use double quotes)"
        return SeqcError(msg, filename=filename, line=line, column=col)
    if isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END"):
        expected = _expected_words(getattr(e, "accepts", None) or e.expected, parser)
        lines = source.splitlines() or [""]
        return SeqcError(f"unexpected end of file; expected {_join(expected)}{_unclosed(None)}", filename=filename,
                         line=len(lines), column=len(lines[-1]) + 1)
    assert isinstance(e, UnexpectedToken)
    tok = e.token
    if tok.type == "_NL":
        what = "end of line"
        if getattr(tok, "line", None) is None or tok.value != "\n" and tok.line is None:
            line, col = 1, 1
    else:
        what = f"'{tok}'" if tok.type not in ("NAME", "NUMBER", "STRING") else f"{tok.type.lower()} '{tok}'"
    terminals = getattr(e, "accepts", None) or e.expected
    expected = _expected_words(terminals, parser)
    if tok.type != "NAME" and _RESERVED.match(str(tok)) and "NAME" in terminals:
        what += " (a reserved word, not usable as a name)"
    span = Span(filename, tok.line or 1, tok.column or 1, tok.end_line, tok.end_column)
    return SeqcError(f"unexpected {what}; expected {_join(expected)}{_unclosed(tok)}", span)


_RESERVED = re.compile(r"[A-Za-z_]\w*\Z")


def _unclosed(tok) -> str:
    """' (the '(' at 3:12 is never closed)' when the error comes after an open bracket's line."""
    opened = _LOCAL.postlex.open
    if not opened:
        return ""
    first = opened[-1]
    if tok is not None and (tok.line is None or tok.line <= first.line):
        return ""
    return f" (the '{first}' at {first.line}:{first.column} is never closed)"


_OPERATORS = {"PLUS", "MINUS", "STAR", "SLASH", "PERCENT", "__ANON_0", "__ANON_1"}


def _expected_words(terminals, parser) -> list[str]:
    terminals = set(terminals)
    words = set()
    if len(terminals & _OPERATORS) >= 3:
        terminals -= _OPERATORS | {"LPAR"}
        words.add("an operator")
    if {"NAME", "NUMBER", "STRING"} <= terminals:
        terminals -= {"NAME", "NUMBER", "STRING", "LPAR", "LSQB", "MINUS", "TRUE", "FALSE"}
        words.add("an expression")
    words |= {_word(t, parser) for t in terminals}
    return sorted(words) or ["something else"]


def _join(words) -> str:
    words = list(words)
    if len(words) > 6:
        words = words[:6] + ["..."]
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def read_spec_bytes(path) -> bytes:
    """The bytes of the spec file `path`, checked before and while reading: it
    must be a regular file (not a FIFO, device or directory, which could block
    or never end) no larger than SEQC_MAX_SPEC_BYTES; at most that many bytes
    plus one are ever read."""
    name = os.fspath(path)
    most = limit("SEQC_MAX_SPEC_BYTES")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(name, flags)   # non-blocking: opening a FIFO must not wait for a writer
    except OSError as e:
        raise SeqcError(f"cannot read file: {e.strerror or e}", filename=str(path)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket"
                    if stat.S_ISSOCK(mode) else "not a plain file")
            raise SeqcError(f"cannot read file: it is {kind}, not a regular file (use '-' to read a spec "
                            f"from standard input)", filename=str(path))
        size = os.fstat(fd).st_size
        if size > most:
            raise SeqcError(f"spec file is too large ({size} bytes; at most {most}; "
                            f"{how_to_raise('SEQC_MAX_SPEC_BYTES')})", filename=str(path))
        chunks, got = [], 0
        while got <= most:
            chunk = os.read(fd, min(1 << 20, most + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as e:
        raise SeqcError(f"cannot read file: {e.strerror or e}", filename=str(path)) from None
    finally:
        os.close(fd)
    if got > most:   # it grew while we read it
        raise SeqcError(f"spec file is too large (more than {most} bytes; {how_to_raise('SEQC_MAX_SPEC_BYTES')})",
                        filename=str(path))
    return b"".join(chunks)


def is_spec_name(path) -> bool:
    """Files named *.seq are specs; the text of any other file is never quoted in errors."""
    return os.fspath(path).endswith(".seq")


def parse_file(path, name: str | None = None) -> ast.Module:
    """Read and parse a .seq file (named `name` in spans and errors, default the
    path); a missing, unreadable or oversized file is a SeqcError."""
    return parse(read_spec_bytes(path), name or os.fspath(path), quote=is_spec_name(path))
