"""The formatter: parse(format_module(m)) == m for random well-formed ASTs and
for every example, formatting is idempotent, and parentheses are minimal."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import seqc
from seqc import ast as A
from seqc.fmt import KEYWORDS, format_expr, format_module

seqc.parse("model M() {}")  # the parser raises the recursion limit once; do it before hypothesis watches

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("**/*.seq"))
LIBRARY = sorted((ROOT / "seqc" / "stdlib").glob("*.seq"))      # include "std/NAME.seq"
SETTINGS = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- strategies for well-formed ASTs ---------------------------------------------------------------

RESERVED = {"model", "block", "include", "input", "return", "repeat", "as", "true", "false"}
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,7}", fullmatch=True).filter(lambda s: s not in RESERVED)
# close misses of reserved words are ordinary names
names = st.one_of(names, st.sampled_from(["models", "blocks", "inputs", "as_", "True", "_", "self", "int", "x1"]))

numbers = st.one_of(
    st.integers(0, 2 ** 62),
    st.floats(min_value=0.0, allow_nan=False, allow_infinity=False).filter(lambda f: math.copysign(1, f) > 0),
).map(A.Number)
strings = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters='"\\'),
                  max_size=12).map(A.String)
leaves = st.one_of(numbers, strings, st.booleans().map(A.Bool), names.map(A.Name))


OPS = ["+", "-", "*", "/", "//", "%", "**"]


def _unique_keywords(kws):
    seen, out = set(), []
    for k in kws:
        if k.name not in seen:
            seen.add(k.name)
            out.append(k)
    return tuple(out)


def _branches(sub):
    small = st.lists(sub, max_size=3).map(tuple)
    keywords = st.lists(st.builds(A.Keyword, names, sub), max_size=3).map(_unique_keywords)
    return st.one_of(
        st.builds(A.BinOp, st.sampled_from(OPS), sub, sub),
        st.builds(A.Neg, sub),
        st.builds(A.ListExpr, small),
        st.builds(A.Call, names, small, keywords),
    )


exprs = st.recursive(leaves, _branches, max_leaves=12)

# operators only, densely nested: where precedence and associativity are decided
arithmetic = st.recursive(
    st.one_of(st.sampled_from("abc").map(A.Name), st.integers(0, 9).map(A.Number), st.just(A.Number(0.5))),
    lambda sub: st.one_of(st.builds(A.BinOp, st.sampled_from(OPS), sub, sub),
                          st.builds(A.BinOp, st.sampled_from(OPS), sub, sub), st.builds(A.Neg, sub)),
    max_leaves=8)

statements = st.one_of(
    st.builds(A.InputDecl, names, st.lists(exprs, min_size=1, max_size=4).map(tuple), st.none() | names),
    st.builds(A.Assign, st.lists(names, min_size=1, max_size=3).map(tuple), exprs,
              alias=st.none() | names, repeat=st.none() | exprs),
    st.builds(A.Return, st.lists(exprs, min_size=1, max_size=3).map(tuple)),
)
definitions = st.builds(A.Definition, st.sampled_from(["model", "block"]), names,
                        st.lists(st.builds(A.Param, names, st.none() | exprs), max_size=4).map(tuple),
                        st.lists(statements, max_size=5).map(tuple))
includes = st.builds(A.Include, strings.map(lambda s: s.value))
modules = st.lists(st.one_of(definitions, includes), min_size=1, max_size=4).map(lambda items: A.Module(tuple(items)))


def same(a, b):
    """AST equality, also telling 1 from 1.0 (== alone does not: 1 == 1.0)."""
    return a == b and repr(a) == repr(b)


def items_of(m):
    return m.items


# -- properties --------------------------------------------------------------------------------------

@SETTINGS
@given(modules)
def test_round_trip_random_modules(module):
    text = format_module(module)
    back = seqc.parse(text)
    assert same(items_of(back), items_of(module)), text
    assert format_module(back) == text


@settings(SETTINGS, max_examples=300)
@given(arithmetic)
def test_round_trip_and_minimal_parentheses_of_arithmetic(expr):
    _check_expression(expr)


@SETTINGS
@given(exprs)
def test_round_trip_and_minimal_parentheses(expr):
    _check_expression(expr)


def _check_expression(expr):
    text = format_expr(expr)
    assert same(_parse_expr(text), expr), text
    # every grouping pair of parentheses is needed: without it the text means something else (or nothing)
    for start, end in _grouping_parens(text):
        shorter = text[:start] + text[start + 1:end] + text[end + 1:]
        try:
            assert not same(_parse_expr(shorter), expr), f"redundant parentheses in {text!r}"
        except seqc.SeqcError:
            pass


@SETTINGS
@given(modules)
def test_formatting_parsed_text_is_idempotent(module):
    once = format_module(seqc.parse(format_module(module)))
    assert format_module(seqc.parse(once)) == once


def _parse_expr(text):
    return seqc.parse(f"model M() {{\n  v = {text}\n}}\n").items[0].body[0].value


def _grouping_parens(text):
    """(open, close) index pairs of parentheses that group (not call parentheses), skipping strings."""
    pairs, stack, in_string = [], [], False
    for i, ch in enumerate(text):
        if ch == '"':
            in_string = not in_string
        elif in_string:
            continue
        elif ch == "(":
            stack.append((i, i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_")))
        elif ch == ")":
            start, is_call = stack.pop()
            if not is_call:
                pairs.append((start, i))
    return pairs


# -- examples ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", EXAMPLES + LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_round_trip(path):
    module = seqc.parse(path.read_text(), str(path))
    text = format_module(module)
    assert same(seqc.parse(text).items, module.items)
    assert format_module(seqc.parse(text)) == text
    assert not any(line.lstrip().startswith("#") for line in text.splitlines())  # comments are not kept
    assert not [line for line in text.splitlines() if line.startswith("  ") and len(line) > 100]


def test_formatted_examples_build_the_same_graph(tmp_path):
    """Build every example from formatted text, its std/ includes also formatted (as lib/)."""
    def formatted(path):
        module = seqc.parse(path.read_text(), str(path))
        items = tuple(A.Include("lib/" + i.path[4:]) if isinstance(i, A.Include) and i.path.startswith("std/")
                      else i for i in module.items)
        return format_module(A.Module(items))
    (tmp_path / "lib").mkdir()
    for path in LIBRARY:
        (tmp_path / "lib" / path.name).write_text(formatted(path))
    built = 0
    for path in EXAMPLES:
        text = formatted(path)
        if not re.search(r"^model ", text, re.M):
            continue
        (tmp_path / path.name).write_text(text)
        a = seqc.build_graph(str(path))
        b = seqc.build_graph(str(tmp_path / path.name))
        assert [(n.op, n.name, n.inputs, n.attrs, n.shapes) for n in a.order()] == \
               [(n.op, n.name, n.inputs, n.attrs, n.shapes) for n in b.order()], path.name
        assert a.weight_shapes() == b.weight_shapes()
        assert a.dump().count("\n") == b.dump().count("\n")
        built += 1
    assert built >= 2


# -- the canonical layout ------------------------------------------------------------------------------

@pytest.mark.parametrize("source, canonical", [
    ("a - (b - c)", "a - (b - c)"),
    ("(a - b) - c", "a - b - c"),
    ("((a + b)) * c", "(a + b) * c"),
    ("a / (b * c)", "a / (b * c)"),
    ("(a * b) / c", "a * b / c"),
    ("a ** (b ** c)", "a ** b ** c"),
    ("(a ** b) ** c", "(a ** b) ** c"),
    ("(-a) ** 2", "(-a) ** 2"),
    ("-(a ** 2)", "-a ** 2"),
    ("a ** (-b)", "a ** -b"),
    ("a ** (b * c)", "a ** (b * c)"),
    ("-(a + b)", "-(a + b)"),
    ("(-a) * b", "-a * b"),
    ("a * (-b)", "a * -b"),
    ("a - (-b)", "a - -b"),
    ("-(-a)", "--a"),
    ("f(a,b,k=1)", "f(a, b, k = 1)"),
    ("[1,2.0,1e-3,.5,true,false,\"s\"]", '[1, 2.0, 0.001, 0.5, true, false, "s"]'),
    ("1e20", "1e+20"),
    ("[ ]", "[]"),
    ("g( )", "g()"),
])
def test_canonical_expressions(source, canonical):
    assert format_expr(_parse_expr(source)) == canonical


def test_canonical_module_layout():
    src = """include "a.seq"
include "b.seq"
# comment
model   M(d=4,n) {
    input x : [B,L,d] int
  y,z=repeat( n ) Blk( x,k=2 ) as blocks
  return y,z
}
block Blk(k) {
}
"""
    assert format_module(seqc.parse(src)) == """include "a.seq"
include "b.seq"

model M(d = 4, n) {
  input x: [B, L, d] int
  y, z = repeat(n) Blk(x, k = 2) as blocks
  return y, z
}

block Blk(k) {
}
"""


def test_long_call_is_wrapped_after_its_parenthesis():
    args = ", ".join(f"argument_{i} = {i}" for i in range(12))
    module = seqc.parse(f"model M() {{\n  y = some_block(x, {args}) as name\n  return y\n}}\n")
    text = format_module(module)
    lines = text.splitlines()
    assert all(len(line) <= 100 for line in lines)
    call_lines = [line for line in lines if "argument_" in line]
    assert len(call_lines) >= 2
    column = call_lines[0].index("(") + 1
    assert all(line[:column].isspace() and not line[column].isspace() for line in call_lines[1:])
    assert call_lines[-1].endswith(") as name")
    assert same(seqc.parse(text).items, module.items)


@pytest.mark.parametrize("bad", [
    A.Name("model"), A.Name("1x"), A.Name(""), A.String('say "hi"'), A.String("a\\b"), A.String("two\nlines"),
    A.Number(float("inf")), A.Number(float("nan")), A.BinOp("^", A.Name("a"), A.Name("b")),
])
def test_unwritable_trees_are_refused(bad):
    with pytest.raises(ValueError):
        format_expr(bad)


def test_keywords_match_the_grammar():
    grammar = (ROOT / "grammar" / "seq.lark").read_text()
    assert KEYWORDS == set(re.findall(r'"([a-z]+)"', grammar))
