"""The parser: every construct of the .seq language into the AST written out by hand."""
from __future__ import annotations

import pytest

import seqc
from seqc.ast import (Assign, BinOp, Bool, Call, Definition, Include, InputDecl, Keyword, ListExpr, Module,
                      Name, Neg, Number, Param, Return, String)


def N(x):
    return Name(x)


def num(v):
    return Number(v)


def parse_expr(text: str):
    """The AST of one expression, via a one-statement model."""
    m = seqc.parse(f"model M() {{\n  v = {text}\n}}\n")
    (stmt,) = m.items[0].body
    return stmt.value


def body(text: str):
    return seqc.parse(f"model M() {{\n{text}\n}}\n").items[0].body


# -- whole definitions ------------------------------------------------------------------------

def test_model_with_defaulted_params():
    src = """model Tiny(d_model = 64, n_layers, dt_rank = ceil(d_model / 16)) {
  input x: [B, L, d_model]
  return x
}
"""
    expected = Module((Definition("model", "Tiny", (
        Param("d_model", num(64)),
        Param("n_layers", None),
        Param("dt_rank", Call("ceil", (BinOp("/", N("d_model"), num(16)),), ())),
    ), (
        InputDecl("x", (N("B"), N("L"), N("d_model")), None),
        Return((N("x"),)),
    )),))
    assert seqc.parse(src) == expected


def test_block_include_and_model_in_order():
    src = """include "blocks/a.seq"
include "b.seq"

block Res(d) {
  input x: [B, L, d]
  return x
}

model M() {
  input x: [B, L, 8]
  return Res(x, d = 8)
}
"""
    m = seqc.parse(src, "spec.seq")
    assert m.items == (
        Include("blocks/a.seq"),
        Include("b.seq"),
        Definition("block", "Res", (Param("d", None),),
                   (InputDecl("x", (N("B"), N("L"), N("d")), None), Return((N("x"),)))),
        Definition("model", "M", (),
                   (InputDecl("x", (N("B"), N("L"), num(8)), None),
                    Return((Call("Res", (N("x"),), (Keyword("d", num(8)),)),)))),
    )
    assert m.filename == "spec.seq"
    assert [d.name for d in m.definitions] == ["Res", "M"]


def test_empty_params_and_empty_body():
    assert seqc.parse("model M() {}") == Module((Definition("model", "M", (), ()),))
    assert seqc.parse("block B() {\n}\n") == Module((Definition("block", "B", (), ()),))


def test_trailing_commas_in_params_dims_lists_and_calls():
    src = "model M(a = 1, b = 2,) {\n  input x: [B, 4,]\n  y = f(x, [1, 2,], k = 3,)\n  return y\n}\n"
    (d,) = seqc.parse(src).items
    assert d.params == (Param("a", num(1)), Param("b", num(2)))
    assert d.body[0] == InputDecl("x", (N("B"), num(4)), None)
    assert d.body[1].value == Call("f", (N("x"), ListExpr((num(1), num(2)))), (Keyword("k", num(3)),))


# -- statements ----------------------------------------------------------------------------------

def test_input_with_symbolic_dims_and_int():
    (decl,) = body("  input tokens: [B, L] int")
    assert decl == InputDecl("tokens", (N("B"), N("L")), "int")
    (decl,) = body("  input x: [B, 2 * L, d + 1]")
    assert decl == InputDecl("x", (N("B"), BinOp("*", num(2), N("L")), BinOp("+", N("d"), num(1))), None)


def test_multi_target_assign():
    (a,) = body("  dt, Bt, Ct = split(x_proj, [dt_rank, d_state, d_state])")
    assert a == Assign(("dt", "Bt", "Ct"),
                       Call("split", (N("x_proj"), ListExpr((N("dt_rank"), N("d_state"), N("d_state")))), ()))
    assert a.alias is None and a.repeat is None


def test_residual_arithmetic():
    (r,) = body("  return x + mixer")
    assert r == Return((BinOp("+", N("x"), N("mixer")),))
    (r,) = body("  return x + mixer(norm(x)), y")
    assert r == Return((BinOp("+", N("x"), Call("mixer", (Call("norm", (N("x"),), ()),), ())), N("y")))


def test_param_arithmetic():
    assert parse_expr("2 * expand * d_model") == BinOp("*", BinOp("*", num(2), N("expand")), N("d_model"))
    assert parse_expr("ceil(d_model / 16)") == Call("ceil", (BinOp("/", N("d_model"), num(16)),), ())
    assert parse_expr("dt_rank + 2 * d_state") == BinOp("+", N("dt_rank"), BinOp("*", num(2), N("d_state")))
    assert parse_expr("d // 2 % 3") == BinOp("%", BinOp("//", N("d"), num(2)), num(3))


def test_repeat_with_alias():
    (a,) = body("  x = repeat(n_layers) MambaBlock(x, d_model = d_model) as layers")
    assert a == Assign(("x",), Call("MambaBlock", (N("x"),), (Keyword("d_model", N("d_model")),)),
                       alias="layers", repeat=N("n_layers"))
    (a,) = body("  x = repeat(2 * n) B(x)")
    assert a.repeat == BinOp("*", num(2), N("n")) and a.alias is None


def test_as_self():
    (a,) = body("  y = selective_ssm(u, delta = dt, B = Bt, C = Ct) as self")
    assert a == Assign(("y",), Call("selective_ssm", (N("u"),), (
        Keyword("delta", N("dt")), Keyword("B", N("Bt")), Keyword("C", N("Ct")))), alias="self")


def test_return_several_values():
    (r,) = body("  return a, b * 2, c")
    assert r == Return((N("a"), BinOp("*", N("b"), num(2)), N("c")))


# -- expressions -----------------------------------------------------------------------------------

def test_literals():
    assert parse_expr("42") == num(42) and type(parse_expr("42").value) is int
    assert parse_expr("1.5") == num(1.5)
    assert parse_expr(".25") == num(0.25)
    assert parse_expr("3.") == num(3.0) and type(parse_expr("3.").value) is float
    assert parse_expr("1e-3") == num(0.001) and type(parse_expr("1e3").value) is float
    assert parse_expr("2.5E+2") == num(250.0)
    assert parse_expr("true") == Bool(True)
    assert parse_expr("false") == Bool(False)
    assert parse_expr('"s4d-lin"') == String("s4d-lin")
    assert parse_expr('""') == String("")
    assert parse_expr('"a # not a comment"') == String("a # not a comment")
    assert parse_expr("silu") == N("silu")


def test_keyword_args_and_lists():
    e = parse_expr('linear(x, 4, bias = false, init = "zeros", sizes = [1, [2, 3], []])')
    assert e == Call("linear", (N("x"), num(4)), (
        Keyword("bias", Bool(False)), Keyword("init", String("zeros")),
        Keyword("sizes", ListExpr((num(1), ListExpr((num(2), num(3))), ListExpr(())))),
    ))
    assert parse_expr("f()") == Call("f", (), ())
    assert parse_expr("[]") == ListExpr(())


def test_call_spanning_lines_and_comments():
    src = """# leading comment
model M(a = 1) {   # trailing comment after the brace
  # a comment line in the body

  y = linear(x,      # comment inside the call
             4,
             bias = false
            )
  z = f(a,
        b) as q   # after the statement
  return y
}
# trailing comment
"""
    (d,) = seqc.parse(src).items
    assert d.body == (
        Assign(("y",), Call("linear", (N("x"), num(4)), (Keyword("bias", Bool(False)),))),
        Assign(("z",), Call("f", (N("a"), N("b")), ()), alias="q"),
        Return((N("y"),)),
    )


def test_backslash_continuation_and_crlf():
    (d,) = seqc.parse("model M() {\r\n  y = a + \\\r\n      b\r\n  return y\r\n}\r\n").items
    assert d.body[0] == Assign(("y",), BinOp("+", N("a"), N("b")))


def test_power_is_right_associative():
    assert parse_expr("a ** b ** c") == BinOp("**", N("a"), BinOp("**", N("b"), N("c")))
    assert parse_expr("(a ** b) ** c") == BinOp("**", BinOp("**", N("a"), N("b")), N("c"))
    assert parse_expr("2 * 3 ** 2") == BinOp("*", num(2), BinOp("**", num(3), num(2)))


def test_unary_minus():
    assert parse_expr("-x") == Neg(N("x"))
    assert parse_expr("--x") == Neg(Neg(N("x")))
    assert parse_expr("-2 ** 2") == Neg(BinOp("**", num(2), num(2)))      # like Python: -(2 ** 2)
    assert parse_expr("(-2) ** 2") == BinOp("**", Neg(num(2)), num(2))
    assert parse_expr("2 ** -1") == BinOp("**", num(2), Neg(num(1)))
    assert parse_expr("a - -b") == BinOp("-", N("a"), Neg(N("b")))
    assert parse_expr("-a * b") == BinOp("*", Neg(N("a")), N("b"))
    assert parse_expr("a * -b") == BinOp("*", N("a"), Neg(N("b")))
    assert parse_expr("-(a + b)") == Neg(BinOp("+", N("a"), N("b")))


@pytest.mark.parametrize("text, expected", [
    ("a + b * c", BinOp("+", N("a"), BinOp("*", N("b"), N("c")))),
    ("a * b + c", BinOp("+", BinOp("*", N("a"), N("b")), N("c"))),
    ("(a + b) * c", BinOp("*", BinOp("+", N("a"), N("b")), N("c"))),
    ("a - b - c", BinOp("-", BinOp("-", N("a"), N("b")), N("c"))),
    ("a - (b - c)", BinOp("-", N("a"), BinOp("-", N("b"), N("c")))),
    ("a / b / c", BinOp("/", BinOp("/", N("a"), N("b")), N("c"))),
    ("a // b * c", BinOp("*", BinOp("//", N("a"), N("b")), N("c"))),
    ("a % b + c % d", BinOp("+", BinOp("%", N("a"), N("b")), BinOp("%", N("c"), N("d")))),
    ("a + b ** c * d", BinOp("+", N("a"), BinOp("*", BinOp("**", N("b"), N("c")), N("d")))),
    ("((a))", N("a")),
])
def test_operator_precedence(text, expected):
    assert parse_expr(text) == expected


def test_bytes_input_is_decoded():
    assert seqc.parse(b"model M() {}") == seqc.parse("model M() {}")


# -- spans -------------------------------------------------------------------------------------------

def test_spans():
    src = """include "x.seq"
model M(d = 4) {
  input x: [B, L, d]
  y = linear(x, 2 * d, bias = false) as proj
  return x + y
}
"""
    m = seqc.parse(src, "s.seq")
    inc, d = m.items
    assert (inc.span.file, inc.span.line, inc.span.column) == ("s.seq", 1, 1)
    assert (d.span.line, d.span.column) == (2, 1)
    assert (d.params[0].span.line, d.params[0].span.column) == (2, 9)
    assert (d.params[0].default.span.line, d.params[0].default.span.column) == (2, 13)
    decl, assign, ret = d.body
    assert (decl.span.line, decl.span.column) == (3, 3)
    assert (decl.dims[2].span.line, decl.dims[2].span.column) == (3, 19)
    assert (assign.span.line, assign.span.column) == (4, 3)
    call = assign.value
    assert (call.span.line, call.span.column, call.span.end_line, call.span.end_column) == (4, 7, 4, 37)
    assert (call.args[0].span.line, call.args[0].span.column) == (4, 14)
    mul = call.args[1]
    assert (mul.span.line, mul.span.column, mul.span.end_column) == (4, 17, 22)
    kw = call.kwargs[0]
    assert (kw.span.line, kw.span.column) == (4, 24)
    assert (kw.value.span.line, kw.value.span.column) == (4, 31)
    add = ret.values[0]
    assert (ret.span.line, ret.span.column) == (5, 3)
    assert (add.span.line, add.span.column, add.span.end_column) == (5, 10, 15)
    assert (add.right.span.line, add.right.span.column) == (5, 14)


def test_span_of_call_spanning_lines():
    src = "model M() {\n  y = f(a,\n        b)\n}\n"
    call = seqc.parse(src).items[0].body[0].value
    assert (call.span.line, call.span.column, call.span.end_line, call.span.end_column) == (2, 7, 3, 11)
    assert (call.args[1].span.line, call.args[1].span.column) == (3, 9)


def test_spans_do_not_affect_equality():
    a = seqc.parse("model M() {\n  y = a + b\n}\n")
    b = seqc.parse("\n\nmodel   M( ) {\n\n      y=a+b\n}")
    assert a == b
    assert a.items[0].body[0].span != b.items[0].body[0].span
