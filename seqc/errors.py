"""Located user errors: the one exception type, source spans and caret rendering.

Every mistake a user can make (bad spec, bad parameter, bad shape) surfaces as
``SeqcError``.  ``str(err)`` reads ``FILE:LINE:COL: error: MESSAGE``;
``err.render()`` adds the source line and a caret under the offending span.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

# filename -> source text of the most recently parsed files, so errors can quote
# lines.  Bounded: a long-running process that parses many specs keeps only the
# last few texts (an error about an evicted file prints without its source line).
_SOURCES: "OrderedDict[str, str]" = OrderedDict()
MAX_REMEMBERED = 32


def remember_source(filename: str, text: str) -> None:
    _SOURCES.pop(filename, None)
    _SOURCES[filename] = text
    while len(_SOURCES) > MAX_REMEMBERED:
        _SOURCES.popitem(last=False)


def forget_source(filename: str) -> None:
    _SOURCES.pop(filename, None)


# C0/C1 control characters, DEL, and the Unicode bidirectional overrides that can
# make displayed text differ from what the parser read ("Trojan source").
_INVISIBLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def visible(text: str) -> str:
    """`text` with control characters and escape sequences shown as \\xNN / \\uNNNN,
    so printing it cannot move the cursor, recolour a terminal or reorder text."""
    return _INVISIBLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                          else f"\\u{ord(m.group()):04x}", text)


@dataclass(frozen=True)
class Span:
    """A region of one source file (1-based lines and columns, end exclusive)."""

    file: str
    line: int
    column: int
    end_line: int | None = None
    end_column: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class SeqcError(Exception):
    """A user's mistake, located in a source file where a position exists."""

    def __init__(self, message: str, span: Span | None = None, *, filename: str | None = None,
                 line: int | None = None, column: int | None = None, notes: tuple[str, ...] = ()):
        self.message = message
        if span is not None:
            filename, line, column = span.file, span.line, span.column
        self.span = span
        self.filename = filename
        self.line = line
        self.column = column
        self.notes = tuple(notes)
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.filename or "seqc"
        if self.line is not None:
            where += f":{self.line}:{self.column or 1}"
        return f"{where}: error: {self.message}"

    def source_line(self) -> str | None:
        text = _SOURCES.get(self.filename or "")
        if text is None or self.line is None:
            return None
        lines = text.split("\n")      # the parser counts lines by "\n" only
        if 1 <= self.line <= len(lines):
            return lines[self.line - 1].rstrip("\r")
        return None

    def render(self) -> str:
        """The message, the source line and a caret (what the CLI prints)."""
        out = [visible(str(self))]
        src = self.source_line()
        if src is not None and src.strip():   # a caret under a blank line shows nothing
            col = max(1, self.column or 1)
            # shown text and caret columns after tabs -> one space and escapes made visible
            before = visible(src[:col - 1].expandtabs(1))
            under = src[col - 1:]
            width_src = 1
            if self.span is not None and self.span.end_line == self.line and self.span.end_column:
                width_src = max(1, self.span.end_column - col)
            width_src = min(width_src, max(1, len(under)))
            marked = visible(under[:width_src].expandtabs(1))
            shown = before + marked + visible(under[width_src:].expandtabs(1))
            col = len(before) + 1
            width = max(1, len(marked))
            if len(shown) > 200:  # very long lines: show a window around the column
                start = max(0, col - 80)
                shown = ("..." if start else "") + shown[start:start + 160] + "..."
                col = col - start + (3 if start else 0)
            width = min(width, max(1, len(shown) - col + 1))
            out.append(shown)
            out.append(" " * (col - 1) + "^" + "~" * (width - 1))
        out.extend(visible(f"note: {n}") for n in self.notes)
        return "\n".join(out)


class SeqcWarning(UserWarning):
    """A located warning about a spec that compiles but is probably not what was meant.
    ``str()`` reads ``FILE:LINE:COL: warning: MESSAGE``."""

    def __init__(self, message: str, span: Span | None = None):
        self.message, self.span = message, span
        super().__init__(str(self))

    def __str__(self) -> str:
        where = str(self.span) if self.span is not None else "seqc"
        return f"{where}: warning: {self.message}"


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    import difflib

    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
