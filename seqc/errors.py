"""Located user errors: the one exception type, source spans and caret rendering.

Every mistake a user can make (bad spec, bad parameter, bad shape) surfaces as
``SeqcError``.  ``str(err)`` reads ``FILE:LINE:COL: error: MESSAGE``;
``err.render()`` adds the source line and a caret under the offending span.
"""
from __future__ import annotations

from dataclasses import dataclass

# filename -> source text, filled by the loader so errors can quote lines.
_SOURCES: dict[str, str] = {}


def remember_source(filename: str, text: str) -> None:
    _SOURCES[filename] = text


def forget_source(filename: str) -> None:
    _SOURCES.pop(filename, None)


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
        lines = text.splitlines()
        if 1 <= self.line <= len(lines):
            return lines[self.line - 1]
        return None

    def render(self) -> str:
        """The message, the source line and a caret (what the CLI prints)."""
        out = [str(self)]
        src = self.source_line()
        if src is not None:
            shown = src.expandtabs(1)
            col = max(1, self.column or 1)
            width = 1
            if self.span is not None and self.span.end_line == self.line and self.span.end_column:
                width = max(1, self.span.end_column - col)
            if len(shown) > 200:  # very long lines: show a window around the column
                start = max(0, col - 80)
                shown = ("..." if start else "") + shown[start:start + 160] + "..."
                col = col - start + (3 if start else 0)
            width = min(width, max(1, len(shown) - col + 1))
            out.append(shown)
            out.append(" " * (col - 1) + "^" + "~" * (width - 1))
        out.extend(f"note: {n}" for n in self.notes)
        return "\n".join(out)


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    import difflib

    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
