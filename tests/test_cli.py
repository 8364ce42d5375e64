"""The seqc command: exit codes, located errors without tracebacks, and the
verbs' output."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT, example

from seqc.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_ok(capsys):
    code, out, _ = run(capsys, "check", example("mamba.seq"))
    assert code == 0 and "ok" in out


def test_param_override_and_bad_override(capsys):
    code, out, _ = run(capsys, "check", example("mamba.seq"), "-p", "n_layers=3")
    assert code == 0
    code, _, err = run(capsys, "graph", example("mamba.seq"), "-p", "n_layers=3")
    assert code == 0
    code, _, err = run(capsys, "check", example("mamba.seq"), "-p", "n_layer=3")
    assert code == 2 and "did you mean 'n_layers'" in err and "Traceback" not in err


def test_user_error_is_located_with_caret(tmp_path, capsys):
    f = tmp_path / "bad.seq"
    f.write_text("model M(d = 64) {\n  input x: [B, L, d]\n  y = linear(x, 32)\n  return x + y\n}\n")
    code, _, err = run(capsys, "check", str(f))
    lines = err.splitlines()
    assert code == 2
    assert re.match(rf"^{re.escape(str(f))}:4:10: error: .*dimension 2 is 32 but expected 64", lines[0])
    assert lines[1] == "  return x + y"
    assert lines[2] == " " * 9 + "^~~~~"


def test_missing_file_and_binary_file(tmp_path, capsys):
    code, _, err = run(capsys, "check", str(tmp_path / "nope.seq"))
    assert code == 2 and "cannot read file" in err
    f = tmp_path / "bin.seq"
    f.write_bytes(bytes(range(256)))
    code, _, err = run(capsys, "check", str(f))
    assert code == 2 and "error:" in err and "Traceback" not in err


def test_graph_prints_names_and_shapes_and_dot(tmp_path, capsys):
    dot = tmp_path / "g.dot"
    code, out, _ = run(capsys, "graph", example("mamba.seq"), "--dot", str(dot))
    assert code == 0
    assert "layers.0.mixer.in_proj" in out and "f32[B, L, 256]" in out
    text = dot.read_text()
    assert text.startswith('digraph "Mamba"') and "->" in text


def test_passes_print_after_all_and_time(capsys):
    code, out, _ = run(capsys, "passes", example("hybrid.seq"), "--print-after-all")
    assert code == 0
    for name in ("elaboration", "fold-identities", "discretize", "plan", "mark-fusion-regions"):
        assert f"IR after {name}" in out
    code, out, _ = run(capsys, "passes", example("s4d.seq"), "--time-passes")
    assert code == 0 and "total" in out
    code, _, err = run(capsys, "passes", example("s4d.seq"), "--print-after", "plann")
    assert code == 2 and "did you mean 'plan'" in err


def test_explain_differs_between_short_and_long(capsys):
    _, short, _ = run(capsys, "explain", example("s4d.seq"), "--length", "64", "--train")
    _, long, _ = run(capsys, "explain", example("s4d.seq"), "--length", "16384", "--train")
    win = lambda text: re.search(r"winner: (\w+)", text).group(1)  # noqa: E731
    assert (win(short), win(long)) == ("scan", "conv")


def test_emit_numpy_and_torch(capsys):
    code, out, _ = run(capsys, "emit", example("mamba.seq"), "--backend", "numpy", "-p", "n_layers=1")
    assert code == 0 and "ops.selective_ssm(" in out and "def step(" in out
    code, out, _ = run(capsys, "emit", example("mamba.seq"), "--backend", "torch", "-p", "n_layers=1")
    assert code == 0 and "class Mamba(SeqcModule)" in out and "M[1](v1)  # layers.0.mixer.in_proj" in out
    compile(out, "<emitted>", "exec")


def test_run_and_difftest(capsys):
    code, out, _ = run(capsys, "run", example("lstm.seq"), "--length", "5")
    assert code == 0 and "output (2, 5, 64)" in out
    code, out, _ = run(capsys, "difftest", example("attention.seq"))
    assert code == 0 and "OK" in out


def test_console_script_no_traceback_on_garbage(tmp_path):
    f = tmp_path / "g.seq"
    f.write_text("model {{{ ]]] \x01")
    p = subprocess.run([sys.executable, "-m", "seqc", "check", str(f)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and re.match(r"^.+:\d+:\d+: error: ", p.stderr)


@pytest.mark.skipif(__import__("shutil").which("dot") is None, reason="Graphviz's dot is not installed")
def test_graph_svg(tmp_path, capsys):
    out = tmp_path / "g.svg"
    code, _, _ = run(capsys, "graph", example("mamba.seq"), "--svg", str(out), "-p", "n_layers=1")
    text = out.read_text()
    assert code == 0 and "<svg" in text and "plan=scan" in text


def test_fmt_round_trips_an_example(tmp_path, capsys):
    code, out, _ = run(capsys, "fmt", example("s4d.seq"))
    assert code == 0
    f = tmp_path / "s4d.seq"
    f.write_text(out)
    code, again, _ = run(capsys, "fmt", str(f), "--check")
    assert code == 0
    import seqc
    assert seqc.parse(out) == seqc.parse(open(example("s4d.seq")).read())
