"""Front-end hardening, in process: what a spec is (file or text), include
roots, sanitised carets, the bounded source cache, comments kept by the
formatter, bounded shape expressions, memory estimates, located warnings and
input checks.  The subprocess-level corpus is tests/hostile/."""
from __future__ import annotations

import glob
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

import seqc
from conftest import EXAMPLES, ROOT, example
from seqc.errors import SeqcError, Span, remember_source, visible

SMALL = "model M(d = 8) {\n  input x: [B, L, d]\n  y = linear(x, d)\n  return y\n}\n"


# -- what a spec is ------------------------------------------------------------------------

def test_path_and_source_are_explicit(tmp_path):
    f = tmp_path / "m.seq"
    f.write_text(SMALL)
    for g in (seqc.build_graph(f), seqc.build_graph(path=str(f)), seqc.build_graph(str(f)),
              seqc.build_graph(source=SMALL), seqc.build_graph(SMALL), seqc.build_graph(seqc.Spec(path=f))):
        assert g.name == "M" and len(g.nodes) == 2
    with pytest.raises(SeqcError, match="give one spec"):
        seqc.build_graph(SMALL, source=SMALL)
    with pytest.raises(SeqcError, match="exactly one"):
        seqc.Spec()
    # a str ending in .seq is a path even when missing: a clear error, not a parse of the name
    with pytest.raises(SeqcError, match="cannot read file"):
        seqc.build_graph(str(tmp_path / "missing.seq"))
    # source= is never read as a file, whatever it names
    with pytest.raises(SeqcError, match="unexpected"):
        seqc.build_graph(source=str(f))


def test_str_naming_another_file_is_deprecated(tmp_path):
    f = tmp_path / "spec.txt"
    f.write_text(SMALL)
    with pytest.warns(DeprecationWarning, match=r"pathlib\.Path"):
        g = seqc.build_graph(str(f))
    assert g.name == "M"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seqc.build_graph(Path(f))          # explicit: no warning


def test_compile_takes_a_spec_object(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "b.seq").write_text("block Twice() {\n  input x: [B, L, 8]\n  return x + x\n}\n")
    src = 'include "b.seq"\nmodel M() {\n  input x: [B, L, 8]\n  y = Twice(x)\n  return y\n}\n'
    with pytest.raises(SeqcError, match="no such file"):
        seqc.compile(src)
    model = seqc.compile(seqc.Spec(source=src, include_paths=[lib]), backend="numpy")
    x = np.random.default_rng(0).standard_normal((1, 3, 8))
    assert np.array_equal(model(x, model.weights), 2 * x)


def test_include_roots(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "blk.seq").write_text("block K() {\n  input x: [B, L, 4]\n  return x\n}\n")
    main = tmp_path / "a" / "b" / "m.seq"
    main.write_text('include "../blk.seq"\nmodel M() {\n  input x: [B, L, 4]\n  y = K(x)\n  return y\n}\n')
    with pytest.raises(SeqcError, match="outside the include roots") as info:
        seqc.build_graph(main)
    assert (info.value.line, info.value.column) == (1, 1)
    assert seqc.build_graph(main, include_paths=[tmp_path / "a"]).name == "M"
    assert seqc.build_graph(main, allow_any_include=True).name == "M"
    # the standard library is its own root and shows as std/ in spans
    g = seqc.build_graph(example("mamba.seq"))
    assert {n.span.file for n in g.nodes.values() if n.span} == {example("mamba.seq"), "std/mamba_block.seq"}


# -- carets ----------------------------------------------------------------------------------

def test_carets_show_control_characters_visibly_and_stay_aligned():
    remember_source("t.seq", "a\tb\x1b[31mc = \u202ed\n")
    e = SeqcError("m", Span("t.seq", 1, 9, 1, 10))        # column 9 is 'c'
    _, line, caret = e.render().split("\n")
    assert line == "a b\\x1b[31mc = \\u202ed" and "\x1b" not in line
    assert line[caret.index("^")] == "c"
    e = SeqcError("m", Span("t.seq", 1, 4, 1, 5))         # the escape itself: underlined whole
    _, line, caret = e.render().split("\n")
    assert caret.strip() == "^~~~" and line[caret.index("^"):][:4] == "\\x1b"
    assert visible("ok\r\n\x07\x9b") == "ok\\x0d\\x0a\\x07\\x9b"


def test_error_in_file_without_position_has_no_caret():
    e = SeqcError("bad thing", filename="x.seq")
    assert e.render() == "x.seq: error: bad thing"


def test_source_cache_is_bounded():
    from seqc import errors
    for k in range(3 * errors.MAX_REMEMBERED):
        seqc.parse(SMALL, f"<cache {k}>")
    assert len(errors._SOURCES) <= errors.MAX_REMEMBERED
    assert f"<cache {3 * errors.MAX_REMEMBERED - 1}>" in errors._SOURCES


# -- formatter keeps comments ----------------------------------------------------------------

def _comment_texts(text):
    from seqc.fmt import comments
    return [c for _, c, _ in comments(text)]


@pytest.mark.parametrize("path", EXAMPLES + sorted(glob.glob(os.path.join(ROOT, "seqc", "stdlib", "*.seq"))),
                         ids=os.path.basename)
def test_fmt_keeps_every_comment_of_the_examples(path):
    from seqc.fmt import format_source
    text = Path(path).read_text()
    out = format_source(text, path)
    assert _comment_texts(out) == _comment_texts(text) and _comment_texts(text)
    assert seqc.parse(out, "<fmt>") == seqc.parse(text, path)
    assert format_source(out) == out


def test_fmt_places_comments_beside_what_they_annotate():
    from seqc.fmt import format_source
    src = ('# top\ninclude "std/mamba_block.seq"  # lib\n\n# about M\nmodel M(d = 8,  # width\n'
           '        n = 2) {\n  # first\n  input x: [B, L, d]   # in\n  y = linear(x,\n'
           '             d,   # out\n             bias = true)  # end\n  return y  # "not # a string"\n'
           '  # dangling\n}  # closing\n# tail\n')
    out = format_source(src)
    assert out == ('# top\ninclude "std/mamba_block.seq"  # lib\n\n# about M\nmodel M(d = 8, n = 2) {  # width\n'
                   '  # first\n  input x: [B, L, d]  # in\n  # out\n  # end\n  y = linear(x, d, bias = true)\n'
                   '  return y  # "not # a string"\n  # dangling\n}  # closing\n\n# tail\n')
    assert format_source(out) == out


def test_fmt_cli_check(tmp_path, capsys):
    from seqc.cli import main
    f = tmp_path / "m.seq"
    f.write_text("model M(d=8) {  # note\n  input x: [B, L, d]\n  return x\n}\n")
    assert main(["fmt", str(f), "--check"]) == 1
    assert main(["fmt", str(f)]) == 0
    out = capsys.readouterr().out
    assert "# note" in out
    f.write_text(out)
    assert main(["fmt", str(f), "--check"]) == 0


# -- elaboration limits and checks -----------------------------------------------------------

def test_floor_chains_stay_small_and_compare_equal():
    src = ("block Q() {\n  input x: [B, S, 8]\n  return x\n}\n"
           "model M() {\n  input x: [B, L, 8]\n  input y: [B, L // 2 // 2 // 2, 8]\n"
           "  z = Q(y)\n  return z\n}\n")
    g = seqc.build_graph(src)
    shape = g.nodes[g.inputs[1]].shape
    assert str(shape[1]) == "floor(L/8)"


def test_work_limit_names_its_variable(monkeypatch):
    monkeypatch.setenv("SEQC_MAX_NODES", "10")
    with pytest.raises(SeqcError, match=r"more than 10 steps .*SEQC_MAX_NODES") as info:
        seqc.build_graph(example("mamba.seq"))
    assert info.value.line is not None
    monkeypatch.setenv("SEQC_MAX_NODES", "100000")
    assert seqc.build_graph(example("mamba.seq")).name == "Mamba"


def test_params_must_be_a_dict_of_one_line_values():
    with pytest.raises(SeqcError, match="params must be a dict"):
        seqc.build_graph(SMALL, params="abc")
    with pytest.raises(SeqcError, match="cannot appear in a parameter value"):
        seqc.build_graph(SMALL, params={"d": "1\n}\nmodel X() {"})
    with pytest.raises(SeqcError, match=r"'ceil' gives 1e\+300, too large") as info:
        seqc.build_graph(SMALL, params={"d": "ceil(1e300)"})
    assert info.value.line == 1      # located at the parameter


def test_unused_layer_warns_with_its_location():
    src = "model M(d = 8) {\n  input x: [B, L, d]\n  y = linear(x, d)\n  z = linear(x, 4)\n  return y\n}\n"
    with pytest.warns(seqc.SeqcWarning) as record:
        seqc.build_graph(src)
    assert [str(w.message) for w in record] == ["<string>:4:7: warning: the result of 'linear' layer 'z' is "
                                                "never used (its weights reach no output)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seqc.build_graph(SMALL)


def test_memory_estimate_counts_weights_and_activations():
    from seqc.memory import estimate
    g = seqc.build_graph(SMALL.replace("d = 8", "d = 100"))
    est = estimate(g, batch=3, length=50, itemsize=4)
    assert est.weights == (100 * 100 + 100) * 4
    assert est.activations == 2 * 3 * 50 * 100 * 4      # the input and the linear's output
    g = seqc.build_graph(example("lstm.seq"), {"hidden": 64, "d_model": 32, "layers": 1})
    est = estimate(g, batch=2, length=10, itemsize=8)
    torch_lstm = 4 * 64 * (32 + 64 + 2)                    # weight_ih, weight_hh, two biases
    assert est.weights == torch_lstm * 8
    # input, output, and the (h, c) states over the sequence
    assert est.activations == (2 * 10 * 32 + 2 * 10 * 64 + 2 * 10 * 2 * 64) * 8


# -- inputs --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_complex_and_bool_inputs_are_refused(backend):
    import torch
    model = seqc.compile(SMALL, backend=backend)
    call = (lambda x: model(x, model.weights)) if backend == "numpy" else model
    make = np.zeros if backend == "numpy" else torch.zeros
    cplx = np.complex128 if backend == "numpy" else torch.complex64
    with pytest.raises(SeqcError, match="complex"):
        call(make((1, 3, 8), dtype=cplx))
    with pytest.raises(SeqcError, match="booleans"):
        call(make((1, 3, 8), dtype=bool if backend == "numpy" else torch.bool))


def test_run_uses_torch_in_eval_mode(tmp_path, capsys):
    """`seqc run` defaults to the torch backend and runs with dropout off: a spec with
    dropout(p=0.9) prints the same statistics as the same spec without it."""
    from seqc.cli import main
    with_dropout = tmp_path / "d.seq"
    with_dropout.write_text(SMALL.replace("  return y", "  z = dropout(y, p = 0.9)\n  return z"))
    plain = tmp_path / "p.seq"
    plain.write_text(SMALL)
    outs = []
    for f in (with_dropout, plain):
        assert main(["run", str(f), "-L", "16", "--seed", "3"]) == 0
        outs.append(capsys.readouterr().out.splitlines())
    assert outs[0][0].startswith("model M on torch:")
    assert outs[0][1] == outs[1][1] and "std" in outs[0][1]
    assert re.match(r"  forward \d+\.\d ms \(first call \d+\.\d ms", outs[0][2])


def test_compile_and_difftest_take_path_and_source_keywords(tmp_path):
    f = tmp_path / "m.seq"
    f.write_text(SMALL)
    a = seqc.compile(path=str(f), backend="numpy")
    b = seqc.compile(source=SMALL, backend="numpy", params={"d": 8})
    assert a.graph.name == b.graph.name == "M"
    assert seqc.difftest(source=SMALL, length=4).ok
    with pytest.raises(SeqcError, match="seed must be a non-negative"):
        seqc.compile(source=SMALL, seed=-1)
    with pytest.raises(SeqcError, match="params must be a dict"):
        seqc.compile(SMALL, params="abc")
    for bad in (float("nan"), -1, 0):
        with pytest.raises(SeqcError, match="tolerance must be"):
            seqc.difftest(source=SMALL, tolerance=bad)
