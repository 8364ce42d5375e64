"""Typed AST of a .seq file: small frozen dataclasses, each carrying its span.

Spans are excluded from equality so that a printed-then-reparsed spec compares
equal to the original (the formatter's round-trip property).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .errors import Span


def _span():
    return field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Number:
    value: Union[int, float]
    span: Span = _span()


@dataclass(frozen=True)
class String:
    value: str
    span: Span = _span()


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span = _span()


@dataclass(frozen=True)
class Name:
    id: str
    span: Span = _span()


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * / // % **
    left: "Expr"
    right: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class ListExpr:
    items: tuple["Expr", ...]
    span: Span = _span()


@dataclass(frozen=True)
class Keyword:
    name: str
    value: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple["Expr", ...]
    kwargs: tuple[Keyword, ...]
    span: Span = _span()


Expr = Union[Number, String, Bool, Name, BinOp, Neg, ListExpr, Call]


@dataclass(frozen=True)
class Param:
    name: str
    default: Expr | None
    span: Span = _span()


@dataclass(frozen=True)
class InputDecl:
    name: str
    dims: tuple[Expr, ...]
    dtype: str | None
    span: Span = _span()


@dataclass(frozen=True)
class Assign:
    targets: tuple[str, ...]
    value: Expr
    alias: str | None = None       # `as NAME`: module name for the layer (or `self`)
    repeat: Expr | None = None     # `repeat(n) Block(x)`: chain n instances
    span: Span = _span()


@dataclass(frozen=True)
class Return:
    values: tuple[Expr, ...]
    span: Span = _span()


Stmt = Union[InputDecl, Assign, Return]


@dataclass(frozen=True)
class Definition:
    """A `model` or a `block`: named parameters with defaults, then a body."""

    kind: str  # "model" | "block"
    name: str
    params: tuple[Param, ...]
    body: tuple[Stmt, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Include:
    path: str
    span: Span = _span()


@dataclass(frozen=True)
class Module:
    """One parsed file."""

    items: tuple[Union[Include, Definition], ...]
    filename: str = field(default="<string>", compare=False)

    @property
    def definitions(self) -> tuple[Definition, ...]:
        return tuple(i for i in self.items if isinstance(i, Definition))
