"""Fuzzing the front end: whatever text comes in, the only exception that may
come out of ``seqc.parse`` / ``seqc.build_graph`` is a well-formed SeqcError."""
from __future__ import annotations

import os
import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

import seqc
from seqc import SeqcError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("**/*.seq"))
LIBRARY = sorted((ROOT / "seqc" / "stdlib").glob("*.seq"))
# Includes of "std/..." resolve from source text too, so mutated specs are built as text.
MODEL_SPECS = [p.read_text() for p in EXAMPLES if re.search(r"^model ", p.read_text(), re.M)]
SPECS = [p.read_text() for p in EXAMPLES + LIBRARY]

seqc.parse("model M() {}")  # the parser raises the recursion limit once; do it before hypothesis watches

ERROR_FORM = re.compile(r"^.+:\d+:\d+: error: .+", re.S)
# SEQC_FUZZ_EXAMPLES=5000 SEQC_FUZZ_RANDOM=1 pytest tests/test_fuzz.py: a longer, fresh hunt.
SETTINGS = settings(max_examples=int(os.environ.get("SEQC_FUZZ_EXAMPLES", "250")), deadline=None, database=None,
                    derandomize=not os.environ.get("SEQC_FUZZ_RANDOM"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TOKEN = re.compile(r'"[^"\n]*"|[A-Za-z_]\w*|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\*\*|//|\s+|.', re.S)
PUNCT = list("()[]{},:=+-*/%#\"'\\.;!@$^&|<>?~`") + ["**", "//", "\n", "\t", "\x00", "\u00e9", "\u200b"]
NUMBERS = ["0", "-1", "-0", "99999999999999999999999", "4611686018427387904", "1e308", "1e999", "0.0", "1e-400",
           "00", "0x10", "1.5", "300", "4097", "65", "2 ** 64", "2 ** 62", "0 // 0", "-(3)"]


def check_outcome(run, source):
    """Run the front end on `source`; a SeqcError must be well formed, anything else fails the test."""
    try:
        run(source)
    except SeqcError as err:
        text = str(err)
        assert err.message
        if err.line is not None:
            assert ERROR_FORM.match(text), text
            assert isinstance(err.column, int) and err.line >= 1 and err.column >= 1, text
        rendered = err.render()
        assert rendered.startswith(text)


def build_text(source):
    seqc.build_graph(source + "\n")  # a newline makes it source text, never a path


# -- random text -------------------------------------------------------------------------------------

@SETTINGS
@given(st.text(max_size=300))
def test_random_text(text):
    check_outcome(seqc.parse, text)
    check_outcome(build_text, text)


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes(data):
    check_outcome(seqc.parse, data)


@SETTINGS
@given(st.lists(st.sampled_from(
    ["model", "block", "include", "input", "return", "repeat", "as", "true", "false", "M", "x", "B", "L", "d",
     "linear", "split", "selective_ssm", "rmsnorm", "conv1d", "ceil", "(", ")", "[", "]", "{", "}", ",", ":", "=",
     "+", "-", "*", "**", "/", "//", "%", "\n", " ", "1", "0", "2.5", '"s"', "#c\n", "int", "self"]), max_size=80))
def test_random_token_soup(tokens):
    source = " ".join(tokens)
    check_outcome(seqc.parse, source)
    check_outcome(build_text, source)


# -- mutations of the valid examples -----------------------------------------------------------------

def _mutate(data, source: str) -> str:
    """Apply 1-4 random edits to `source`, at the token or the character level."""
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        tokens = TOKEN.findall(source)
        kind = data.draw(st.sampled_from(["del_tok", "dup_tok", "swap_tok", "del_char", "dup_char", "swap_char",
                                          "punct", "number", "name"]), label="kind")
        if kind.endswith("_tok") and tokens:
            i = data.draw(st.integers(0, len(tokens) - 1), label="i")
            if kind == "del_tok":
                del tokens[i]
            elif kind == "dup_tok":
                tokens.insert(i, tokens[i])
            else:
                j = data.draw(st.integers(0, len(tokens) - 1), label="j")
                tokens[i], tokens[j] = tokens[j], tokens[i]
            source = "".join(tokens)
        elif kind.endswith("_char") and source:
            i = data.draw(st.integers(0, len(source) - 1), label="i")
            if kind == "del_char":
                source = source[:i] + source[i + 1:]
            elif kind == "dup_char":
                source = source[:i] + source[i] + source[i:]
            else:
                j = data.draw(st.integers(0, len(source) - 1), label="j")
                chars = list(source)
                chars[i], chars[j] = chars[j], chars[i]
                source = "".join(chars)
        elif kind == "punct":
            i = data.draw(st.integers(0, len(source)), label="i")
            source = source[:i] + data.draw(st.sampled_from(PUNCT), label="p") + source[i:]
        elif kind == "number":
            spots = [m for m in re.finditer(r"(?<![\w.])\d+(?:\.\d*)?", source)]
            if spots:
                m = spots[data.draw(st.integers(0, len(spots) - 1), label="which")]
                source = source[:m.start()] + data.draw(st.sampled_from(NUMBERS), label="n") + source[m.end():]
        else:  # rename one occurrence of a name to a near miss or a reserved word
            spots = [m for m in re.finditer(r"[A-Za-z_]\w*", source)]
            if spots:
                m = spots[data.draw(st.integers(0, len(spots) - 1), label="which")]
                new = data.draw(st.sampled_from([m.group()[:-1] or "q", m.group() + "s", "model", "input", "as",
                                                 "self", "x", "B", "linear"]), label="new")
                source = source[:m.start()] + new + source[m.end():]
    return source


@SETTINGS
@given(st.data())
def test_mutated_examples_parse(data):
    source = _mutate(data, data.draw(st.sampled_from(SPECS), label="spec"))
    check_outcome(seqc.parse, source)


@SETTINGS
@given(st.data())
def test_mutated_examples_build(data):
    source = _mutate(data, data.draw(st.sampled_from(MODEL_SPECS), label="spec"))
    check_outcome(build_text, source)


@SETTINGS
@given(st.dictionaries(st.sampled_from(["d_model", "n_layers", "d_state", "expand", "d_conv", "dt_rank",
                                        "d_modle", "layers", ""]),
                       st.one_of(st.integers(-5, 70), st.integers(), st.floats(), st.booleans(), st.none(),
                                 st.text(max_size=12), st.sampled_from(["2 * 8", "ceil(7 / 2)", "x", "-1", "1e9"]),
                                 st.lists(st.integers(), max_size=2)),
                       max_size=3))
def test_random_parameter_overrides(params):
    def run(source):
        seqc.build_graph(source, params=params)
    check_outcome(run, str(ROOT / "examples" / "mamba.seq"))


def test_the_unmutated_specs_build():
    assert MODEL_SPECS
    for spec in MODEL_SPECS:
        assert seqc.build_graph(spec + "\n").nodes
