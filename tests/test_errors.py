"""Every kind of user mistake is a located SeqcError whose render() quotes the
line and puts a caret under the offending column."""
from __future__ import annotations

import re

import pytest

import seqc
from seqc import SeqcError


def error_of(src, *, build=True, params=None, filename=None) -> SeqcError:
    with pytest.raises(SeqcError) as info:
        if build:
            seqc.build_graph(src, params=params)
        else:
            seqc.parse(src, filename or "<string>")
    return info.value


def check(err: SeqcError, line: int, column: int, *fragments: str, filename: str = "<string>"):
    """Location, message fragments, the `FILE:LINE:COL: error:` form and the caret."""
    assert (err.line, err.column) == (line, column), str(err)
    for f in fragments:
        assert f in err.message, f"{f!r} not in {err.message!r}"
    assert err.filename == filename
    assert str(err) == f"{filename}:{line}:{column}: error: {err.message}"
    rendered = err.render().splitlines()
    assert rendered[0] == str(err)
    src_line, caret = rendered[1], rendered[2]
    assert caret.lstrip(" ").startswith("^") and set(caret.strip()) <= {"^", "~"}
    return src_line, caret


def caret_at(err: SeqcError, column: int, source_line: str):
    src_line, caret = check(err, err.line, err.column, filename=err.filename)
    assert src_line == source_line
    assert caret.index("^") == column - 1


def model(body: str, params: str = "") -> str:
    """A model with an input x: [B, L, 8] on line 2; `body` starts on line 3."""
    return f"model M({params}) {{\n  input x: [B, L, 8]\n{body}\n}}\n"


# -- syntax errors -------------------------------------------------------------------------------

def test_missing_close_paren_names_the_open_one():
    src = model("  y = linear(x, 4\n  return y")
    e = error_of(src, build=False)
    check(e, 4, 3, "unexpected 'return'", "'(' at 3:13 is never closed")
    caret_at(e, 3, "  return y")


def test_missing_close_paren_at_end_of_file():
    e = error_of("model M() {\n  y = f(a,\n", build=False)
    check(e, 2, 11, "unexpected end of file", "'(' at 2:8 is never closed")


def test_unexpected_token():
    src = model("  y = linear(x, 4) )\n  return y")
    e = error_of(src, build=False)
    check(e, 3, 20, "unexpected ')'")
    caret_at(e, 20, "  y = linear(x, 4) )")
    e = error_of(model("  y = 1 +* 2\n  return x"), build=False)
    check(e, 3, 10, "unexpected '*'", "expected an expression")
    e = error_of("model M( {\n}\n", build=False)
    check(e, 1, 10, "unexpected '{'", "')'")


def test_unexpected_end_of_line():
    e = error_of(model("  y = x +\n  return y"), build=False)
    check(e, 3, 10, "unexpected end of line", "expected an expression")


def test_unexpected_end_of_file():
    e = error_of("model M() {\n  input x: [B, L, 8]\n  return x\n", build=False)
    check(e, 3, 11, "unexpected end of file", "'}'")
    caret_at(e, 11, "  return x")


def test_reserved_word_as_a_name():
    e = error_of(model("  y = model\n  return y"), build=False)
    check(e, 3, 7, "unexpected 'model'", "reserved word")


def test_single_quoted_string():
    src = model("  y = linear(x, 4, init = 'zeros')\n  return y")
    e = error_of(src, build=False)
    check(e, 3, 27, "unexpected character", "double quotes")
    caret_at(e, 27, "  y = linear(x, 4, init = 'zeros')")


def test_stray_closing_brace():
    e = error_of(model("  return x") + "}\n", build=False)
    check(e, 5, 1, "unexpected '}'")


def test_keyword_argument_twice_and_positional_after_keyword():
    e = error_of(model("  y = linear(x, 4, bias = true, bias = false)\n  return y"), build=False)
    check(e, 3, 33, "'bias' given twice")
    e = error_of(model("  y = linear(x, bias = true, 4)\n  return y"), build=False)
    check(e, 3, 30, "positional argument after a keyword")


# -- names and definitions -------------------------------------------------------------------------

def test_undefined_name_did_you_mean():
    src = model("  y = linear(xx, 4)\n  return y")
    e = error_of(src)
    check(e, 3, 14, "undefined name 'xx'", "did you mean 'x'")
    caret_at(e, 14, "  y = linear(xx, 4)")


def test_undefined_parameter_in_default():
    e = error_of("model M(d_model = 4, h = d_modl * 2) {\n  input x: [B, L, 8]\n  return x\n}\n")
    check(e, 1, 26, "undefined name 'd_modl'", "did you mean 'd_model'")


def test_duplicate_layer_names():
    e = error_of(model("  y = linear(x, 4) as a\n  z = linear(y, 4) as a\n  return z"))
    check(e, 4, 7, "layer named 'a' already exists", "3:7")
    caret_at(e, 7, "  z = linear(y, 4) as a")


def test_duplicate_definitions():
    src = ("block A() {\n  input x: [B]\n  return x\n}\n"
           "block A() {\n  input x: [B]\n  return x\n}\n"
           "model M() {\n  input x: [B]\n  return A(x)\n}\n")
    e = error_of(src)
    check(e, 5, 1, "'A' is defined twice", "first at <string>:1:1")
    caret_at(e, 1, "block A() {")


def test_duplicate_parameter():
    e = error_of(model("  return x", "d = 1, d = 2"))
    check(e, 1, 16, "parameter 'd' declared twice")


def test_unknown_layer_did_you_mean():
    e = error_of(model("  y = lineer(x, 4)\n  return y"))
    check(e, 3, 7, "unknown layer or block 'lineer'", "did you mean 'linear'")
    caret_at(e, 7, "  y = lineer(x, 4)")


def test_unknown_keyword_did_you_mean():
    e = error_of(model("  y = linear(x, 4, biass = false)\n  return y"))
    check(e, 3, 20, "'linear' has no argument 'biass'", "did you mean 'bias'")
    caret_at(e, 20, "  y = linear(x, 4, biass = false)")


def test_unknown_block_parameter_did_you_mean():
    src = ("block A(width) {\n  input x: [B]\n  return x\n}\n"
           "model M() {\n  input x: [B]\n  return A(x, widht = 3)\n}\n")
    e = error_of(src)
    check(e, 7, 15, "'A' has no parameter 'widht'", "did you mean 'width'")


# -- arity ------------------------------------------------------------------------------------------

def test_too_few_tensor_inputs():
    e = error_of(model("  y = selective_ssm(x)\n  return y"))
    check(e, 3, 7, "'selective_ssm' takes 4 tensor input(s)", "got 1", "missing 'delta'")


def test_too_many_results_on_the_left():
    e = error_of(model("  a, b = linear(x, 4)\n  return a"))
    check(e, 3, 3, "2 name(s) on the left", "gives 1 value(s)")
    caret_at(e, 3, "  a, b = linear(x, 4)")


def test_too_many_tensor_inputs():
    e = error_of(model("  y = linear(x, x, 4)\n  return y"))
    check(e, 3, 17, "'linear' takes at most 1 tensor input")


def test_block_input_count():
    src = ("block A() {\n  input x: [B, L, 8]\n  return x\n}\n"
           "model M() {\n  input x: [B, L, 8]\n  return A(x, x)\n}\n")
    e = error_of(src)
    check(e, 7, 10, "block 'A' takes 1 input(s), got 2")


# -- attribute values -------------------------------------------------------------------------------

def test_non_positive_dimension_attribute():
    e = error_of(model("  y = linear(x, 0)\n  return y"))
    check(e, 3, 17, "'linear' argument 'out' must be positive", "got 0")
    e = error_of(model("  y = linear(x, -3)\n  return y"))
    check(e, 3, 17, "must be positive", "got -3")


def test_non_positive_input_dimension():
    e = error_of("model M() {\n  input x: [B, L, 0]\n  return x\n}\n")
    check(e, 2, 19, "dimension 2 of 'x' must be a positive integer", "got 0")


def test_attribute_type_errors():
    e = error_of(model("  y = linear(x, 4, bias = 3)\n  return y"))
    check(e, 3, 20, "'bias' must be true or false", "got 3")
    e = error_of(model("  y = linear(x, 2.5)\n  return y"))
    check(e, 3, 17, "'out' must be an integer", "2.5")
    e = error_of(model("  y = dropout(x, p = 1.5)\n  return y"))
    check(e, 3, 18, "'p' must be at most 0.999", "1.5")


def test_unknown_enum_value_did_you_mean():
    e = error_of(model("  y = conv1d(x, activation = sily)\n  return y"))
    check(e, 3, 17, "unknown value 'sily'", "did you mean 'silu'", "expected one of identity, silu")
    e = error_of(model('  y = ssm(x, init = "s4d-lni")\n  return y'))
    check(e, 3, 14, "unknown value 's4d-lni'", "did you mean 's4d-lin'")


def test_cross_attribute_check_dt_min_above_dt_max():
    line = "  y = ssm(x, dt_min = 0.5, dt_max = 0.01)"
    e = error_of(model(line + "\n  return y"))
    check(e, 3, line.index("dt_max") + 1, "'ssm': dt_min (0.5) must not exceed dt_max (0.01)")
    line = "  y = linear(x, 8, init = mamba_dt, dt_min = 0.2)"       # dt_max keeps its default 0.1
    e = error_of(model(line + "\n  return y"))
    check(e, 3, line.index("dt_min") + 1, "'linear': dt_min (0.2) must not exceed dt_max (0.1)")
    seqc.build_graph(model("  y = ssm(x, dt_min = 0.01, dt_max = 0.01)\n  return y"))   # equal is fine


def test_missing_required_attribute():
    e = error_of(model("  y = linear(x)\n  return y"))
    check(e, 3, 7, "'linear' needs argument 'out'")


# -- shapes -----------------------------------------------------------------------------------------

def test_elementwise_shape_mismatch_names_dimension_and_values():
    e = error_of(model("  y = linear(x, 4)\n  return x + y"))
    src_line, caret = check(e, 4, 10, "dimension 2", "is 4", "expected 8", "[B, L, 8]", "[B, L, 4]")
    assert src_line == "  return x + y" and caret == "         ^~~~~"


def test_selective_ssm_with_b_of_the_wrong_width():
    src = model("  dt = linear(x, 8)\n  Bt = linear(x, 5)\n  Ct = linear(x, 16)\n"
                "  y = selective_ssm(x, delta = dt, B = Bt, C = Ct, d_state = 16)\n  return y")
    e = error_of(src)
    check(e, 6, 40, "B must have d_state features", "dimension 2 is 5", "expected 16")
    caret_at(e, 40, "  y = selective_ssm(x, delta = dt, B = Bt, C = Ct, d_state = 16)")


def test_split_sizes_do_not_add_up():
    e = error_of(model("  a, b = split(x, [3, 4])\n  return a"))
    check(e, 3, 16, "add up to 7", "8 features")


def test_block_input_shape_mismatch():
    src = ("block A() {\n  input x: [B, L, 4]\n  return x\n}\n"
           "model M() {\n  input x: [B, L, 8]\n  return A(x)\n}\n")
    e = error_of(src)
    check(e, 7, 10, "dimension 2 is 8", "expects 4")


def test_repeat_of_shape_changing_block():
    src = ("block A() {\n  input x: [B, L, 8]\n  return linear(x, 4)\n}\n"
           "model M() {\n  input x: [B, L, 8]\n  y = repeat(2) A(x)\n  return y\n}\n")
    e = error_of(src)
    check(e, 7, 17, "output shape equals its input shape")


def test_tensor_binop_rejected():
    e = error_of(model("  return x % x"))
    check(e, 3, 10, "cannot apply '%'", "tensors combine with +, -, * and /")


# -- recursion and includes -----------------------------------------------------------------------

def test_block_cycle():
    src = ("block A() {\n  input x: [B]\n  y = B(x)\n  return y\n}\n"
           "block B() {\n  input x: [B]\n  y = A(x)\n  return y\n}\n"
           "model M() {\n  input x: [B]\n  return A(x)\n}\n")
    e = error_of(src)
    check(e, 8, 7, "instantiates itself", "A -> B -> A")
    caret_at(e, 7, "  y = A(x)")


def test_direct_recursion():
    src = ("block A() {\n  input x: [B]\n  return A(x)\n}\n"
           "model M() {\n  input x: [B]\n  return A(x)\n}\n")
    check(error_of(src), 3, 10, "instantiates itself", "A -> A")


def test_include_cycle(tmp_path):
    (tmp_path / "a.seq").write_text('include "b.seq"\nmodel M() {\n  input x: [B]\n  return x\n}\n')
    (tmp_path / "b.seq").write_text('\ninclude "a.seq"\nblock Q() {\n  input x: [B]\n  return x\n}\n')
    e = error_of(str(tmp_path / "a.seq"))
    check(e, 2, 1, "include cycle", "a.seq -> b.seq -> a.seq", filename=str(tmp_path / "b.seq"))
    caret_at(e, 1, 'include "a.seq"')


def test_self_include(tmp_path):
    (tmp_path / "a.seq").write_text('include "a.seq"\nmodel M() {\n  input x: [B]\n  return x\n}\n')
    e = error_of(tmp_path / "a.seq")
    check(e, 1, 1, "include cycle", filename=str(tmp_path / "a.seq"))


def test_missing_include_file(tmp_path):
    (tmp_path / "a.seq").write_text('# header\ninclude "sub/nope.seq"\nmodel M() {\n  input x: [B]\n  return x\n}\n')
    e = error_of(str(tmp_path / "a.seq"))
    check(e, 2, 1, "cannot include 'sub/nope.seq'", "no such file", filename=str(tmp_path / "a.seq"))


def test_error_inside_included_file(tmp_path):
    (tmp_path / "lib.seq").write_text("block A() {\n  input x: [B, L, 8]\n  return linear(x, 0)\n}\n")
    (tmp_path / "m.seq").write_text('include "lib.seq"\nmodel M() {\n  input x: [B, L, 8]\n  return A(x)\n}\n')
    e = error_of(str(tmp_path / "m.seq"))
    check(e, 3, 20, "must be positive", filename=str(tmp_path / "lib.seq"))
    caret_at(e, 20, "  return linear(x, 0)")


def test_missing_spec_file(tmp_path):
    path = str(tmp_path / "nothere.seq")
    e = error_of(path)
    assert e.filename == path and e.line is None
    assert "cannot read file" in e.message
    assert str(e) == f"{path}: error: {e.message}"
    assert e.render() == str(e)


# -- odd input ----------------------------------------------------------------------------------------

def test_binary_garbage():
    e = error_of(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", build=False)
    assert (e.line, e.column) == (1, 1) and "binary" in e.message
    # nothing from an earlier parse of the same name may be quoted
    assert e.render() == str(e)


def test_control_character_in_text():
    e = error_of("model M() {\n  y = \x01\n}\n", build=False)
    check(e, 2, 7, "control character")


def test_empty_file():
    for src in ("", "   \n\n\t\n"):
        e = error_of(src, build=False)
        assert (e.line, e.column) == (1, 1) and "empty file" in e.message
    e = error_of("")
    assert e.render() == str(e)


def test_comment_only_file():
    e = error_of("# just a comment\n\n   # another\n", build=False)
    src_line, caret = check(e, 1, 1, "empty file")
    assert src_line == "# just a comment"


def test_file_without_a_model():
    e = error_of("block A() {\n  input x: [B]\n  return x\n}\n")
    # a whole-file error: named by file, no invented line:column and no caret
    assert (e.line, e.column) == (None, None) and "no 'model'" in e.message
    assert str(e) == "<string>: error: no 'model' definition in this file" and e.render() == str(e)


def test_huge_numbers():
    e = error_of(model("  y = linear(x, 99999999999999999999999999)\n  return y"), build=False)
    check(e, 3, 17, "too large")
    e = error_of(model("  y = linear(x, 1e999)\n  return y"), build=False)
    check(e, 3, 17, "too large")
    e = error_of(model("  y = linear(x, 2 ** 60 * 2 ** 60)\n  return y"))
    check(e, 3, 17, "too large")
    assert seqc.parse(model("  y = linear(x, 4611686018427387904)\n  return y"))   # 2 ** 62 is the limit
    e = error_of(model("  y = linear(x, 4611686018427387905)\n  return y"), build=False)
    check(e, 3, 17, "too large")


def test_division_by_zero_in_parameters():
    e = error_of(model("  return x", "d = 4 // 0"))
    check(e, 1, 13, "division by zero")


def test_deep_nesting():
    ok = "(" * 60 + "4" + ")" * 60
    g = seqc.build_graph(model(f"  y = linear(x, {ok})\n  return y"))
    assert g.nodes[1].attrs["out"] == 4
    deep = "(" * 200 + "4" + ")" * 200
    e = error_of(model(f"  y = linear(x, {deep})\n  return y"), build=False)
    check(e, 3, 17 + 63, "nested more than 64 deep")   # the call's own '(' is the first of 65
    e = error_of("model M() {\n  y = " + "[" * 200 + "]" * 200 + "\n}\n", build=False)
    check(e, 2, 7 + 64, "nested more than 64 deep")   # the 65th '['


def test_long_left_recursive_expression():
    src = model("  return x" + " + x" * 3000)
    g = seqc.build_graph(src)
    assert sum(n.op == "add" for n in g.nodes.values()) == 3000


def test_very_long_line():
    pad = " " * 100_000
    src = model(f"  y = linear(x, 4){pad}xx\n  return y")
    e = error_of(src, build=False)
    column = len("  y = linear(x, 4)") + 100_000 + 1
    assert (e.line, e.column) == (3, column) and "unexpected name 'xx'" in e.message
    msg, shown, caret = e.render().splitlines()
    assert len(shown) < 300 and "xx" in shown
    assert shown[caret.index("^"):].startswith("xx")
    # an error at the start of the same long line
    e = error_of(model(f"  y = lineer(x, 4){pad}\n  return y"))
    _, shown, caret = e.render().splitlines()
    assert (e.line, e.column) == (3, 7) and shown[caret.index("^"):].startswith("lineer")


# -- parameter overrides from Python --------------------------------------------------------------

def test_unknown_override_did_you_mean():
    src = model("  return x", "d_model = 3")
    e = error_of(src, params={"d_modle": 4})
    assert "'M' has no parameter 'd_modle'" in e.message and "did you mean 'd_model'" in e.message
    assert (e.line, e.column) == (1, 1)


@pytest.mark.parametrize("value, fragment", [
    ("abc", "undefined name 'abc'"),
    ("4 +", "bad value '4 +'"),
    ([1], "bad value [1]"),
    (None, "bad value None"),
    (float("nan"), "bad value nan"),
    (float("inf"), "bad value inf"),
    (10 ** 30, "too large"),
])
def test_bad_override_values(value, fragment):
    src = model("  y = linear(x, d_model)\n  return y", "d_model = 3")
    e = error_of(src, params={"d_model": value})
    check(e, 1, 9, fragment, "parameter 'd_model'")


def test_override_value_checked_where_used():
    src = model("  y = linear(x, d_model)\n  return y", "d_model = 3")
    e = error_of(src, params={"d_model": -2})
    check(e, 3, 17, "must be positive", "got -2")
    g = seqc.build_graph(src, params={"d_model": "2 * 5"})   # strings are expressions of the language
    assert g.nodes[1].attrs["out"] == 10


def test_error_string_form():
    e = error_of(model("  return y"))
    assert re.fullmatch(r"<string>:3:10: error: undefined name 'y'.*", str(e))
