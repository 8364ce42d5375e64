"""The compiler fuzzer: random valid .seq programs (tests/spec_strategies.py) must
compile, and every face of the compiled model must agree with every other:

- the NumPy oracle and the torch backend, node by node, in float64 (``seqc.difftest``);
- two execution plans of the torch backend, outputs and every parameter gradient;
- ``step`` token by token and a sequence cut into two chunks (state handed over)
  equal one ``forward`` pass, on both backends (a model with a non-causal layer -
  ``direction = bidirectional``, attention with ``causal = false`` - refuses every
  stateful face with a SeqcError on both);
- ``seqc.fmt``: format -> parse -> format is a fixed point, the AST survives it and
  the formatted files elaborate to the same IR;
- mutated into an invalid program, nothing but a located ``SeqcError`` escapes.

Every failing example shrinks to a minimal spec that hypothesis prints (``note``)
as .seq text; keep it in tests/regressions/ (``test_regressions_from_the_fuzzer``
runs every file there through the same checks).

CI runs a small seeded budget; a longer hunt:
``SEQC_FUZZ_EXAMPLES=1000 SEQC_FUZZ_SEED=3 OMP_NUM_THREADS=1 python -m pytest tests/test_spec_fuzz.py``
(``SEQC_FUZZ_SEED`` unset: derandomized; set: a random run seeded with it).
"""
from __future__ import annotations

import itertools
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, seed, settings, strategies as st

import seqc
from seqc.fmt import format_module
from spec_strategies import MAIN, noisy, specs

seqc.parse("model M() {}")  # the parser raises the recursion limit once; do it before hypothesis watches
# generated programs often compute values they never return: the front end's warning about
# unused layers is expected here
pytestmark = pytest.mark.filterwarnings("ignore::seqc.SeqcWarning")

REGRESSIONS = sorted((Path(__file__).resolve().parent / "regressions").glob("*.seq"))
INVALID = sorted((Path(__file__).resolve().parent / "regressions" / "invalid").glob("*.seq"))
EXAMPLES = int(os.environ.get("SEQC_FUZZ_EXAMPLES", "0"))
SEED = os.environ.get("SEQC_FUZZ_SEED")


def fuzz_settings(ci_examples: int):
    """Bounded and derandomized in CI; SEQC_FUZZ_EXAMPLES / SEQC_FUZZ_SEED for a longer hunt."""
    s = settings(max_examples=EXAMPLES or ci_examples, deadline=None, database=None, derandomize=SEED is None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much])

    def wrap(f):
        f = s(f)
        return seed(int(SEED))(f) if SEED is not None else f
    return wrap


# mutation kinds the front end does not catch yet (with a strict xfail in XFAIL_INVALID below);
# drop one once its regression test passes
KNOWN_BROKEN_KINDS: set[str] = set()
ERROR_FORM = re.compile(r"^.+:\d+:\d+: error: .+", re.S)
TOL = 1e-9           # float64, relative to max(1, |value|): measured worst 2e-12 over 1000 specs
BATCH, LENGTH = 2, 7
LENGTHS = st.one_of(st.integers(1, 9), st.sampled_from([16, 33, 64]))   # short, and long enough for other plans
MODES = ("auto", "conv", "scan", "recurrent")


# -- checks on one spec file (shared by the fuzzer and the regression files) ------------------------------

def input_arrays(graph, rng, batch, length):
    xs = []
    for nid in graph.inputs:
        n = graph.nodes[nid]
        if n.dtype == "int":
            vocab = min(u.attrs["vocab"] for u in graph.users(nid) if u.op == "embedding")
            xs.append(rng.integers(0, vocab, size=(batch, length)))
        else:
            xs.append(rng.standard_normal((batch, length, int(n.shape[-1]))))
    return xs


def as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def to_numpy(x):
    return x.detach().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=float)


def agree(a, b, what: str):
    a, b = as_list(a), as_list(b)
    assert len(a) == len(b), f"{what}: {len(a)} vs {len(b)} outputs"
    for k, (x, y) in enumerate(zip(a, b)):
        x, y = to_numpy(x), to_numpy(y)
        assert x.shape == y.shape, f"{what}: output {k} shapes {x.shape} vs {y.shape}"
        err = float(np.abs(x - y).max(initial=0))
        scale = max(1.0, float(np.abs(x).max(initial=0)))
        assert err <= TOL * scale, f"{what}: output {k} max |diff| {err:.3g} (scale {scale:.3g})"


def flat_state(state, prefix=""):
    if isinstance(state, dict):
        out = {}
        for k, v in state.items():
            out.update(flat_state(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: state}


def cat_time(parts):
    """Per-output concatenation over time of a list of chunk results."""
    per_output = list(zip(*[as_list(p) for p in parts]))
    return [np.concatenate([to_numpy(x) for x in outs], axis=1) for outs in per_output]


def check_backends(path: str, batch=BATCH, length=LENGTH):
    report = seqc.difftest(path, ("numpy", "torch"), batch=batch, length=length, tolerance=TOL)
    assert report.ok, f"numpy vs torch:\n{report}"


def check_plans(path: str, modes: tuple[str, str], batch=BATCH, length=LENGTH):
    """Two plans agree: on torch (outputs and every gradient) and on the NumPy oracle (outputs)."""
    report = seqc.difftest(path, ("torch", "torch"), modes=modes, batch=batch, length=length, tolerance=TOL)
    assert report.grad_abs is not None
    assert report.ok, f"torch plans {modes[0]} vs {modes[1]} (outputs and parameter gradients):\n{report}"
    report = seqc.difftest(path, ("numpy", "numpy"), modes=modes, batch=batch, length=length, tolerance=TOL)
    assert report.ok, f"numpy plans {modes[0]} vs {modes[1]}:\n{report}"


def causal(graph) -> bool:
    """No layer reads later positions (bidirectional ssm / selective_ssm / rglru, attention with
    causal = false): the model has a step and a streaming face."""
    return not any(n.attrs.get("direction") == "bidirectional" or n.attrs.get("causal") is False
                   for n in graph.order())


def check_faces(path: str, cut: int, batch=BATCH, length=LENGTH, mode="auto", seed_: int = 0):
    """step == forward and two chunks == one pass, on numpy and on torch (float64); the torch
    model's plans forced by `mode` where legal.  A model with a non-causal layer has no state:
    both backends refuse every stateful face with a SeqcError, and their forwards agree."""
    ref = seqc.compile(path, backend="numpy")
    tm = seqc.compile(path, backend="torch", mode=mode).double().load_numpy(ref.weights).eval()
    xs = input_arrays(ref.graph, np.random.default_rng(seed_), batch, length)
    ts = [torch.as_tensor(x) for x in xs]
    if not causal(ref.graph):
        with torch.no_grad():
            agree(ref(*xs, ref.weights), tm(*ts), "torch forward vs numpy forward")
            for what, face in (("numpy init_state", lambda: ref.init_state(batch)),
                               ("numpy forward(return_state=True)", lambda: ref(*xs, ref.weights, return_state=True)),
                               ("torch step", lambda: tm.step(*[t[:, 0] for t in ts], tm.init_state(batch))),
                               ("torch forward(return_state=True)", lambda: tm(*ts, return_state=True))):
                with pytest.raises(seqc.SeqcError, match="bidirectional"):
                    face()
        return
    with torch.no_grad():
        whole, final_ref = ref(*xs, ref.weights, return_state=True)
        y, final = tm(*ts, return_state=True)
        agree(whole, y, "torch forward vs numpy forward")
        same_state(final_ref, final, "torch vs numpy final state")
        # token by token
        for name, init, step, args, final_state in (
                ("numpy", lambda: ref.init_state(batch), lambda a, s: ref.step(*a, state=s), xs, final_ref),
                ("torch", lambda: tm.init_state(batch), lambda a, s: tm.step(*a, s), ts, final)):
            state, outs = init(), []
            for t in range(length):
                y_t, state = step([a[:, t] for a in args], state)
                outs.append([to_numpy(o)[:, None] for o in as_list(y_t)])
            agree(whole, cat_time(outs), f"{name} step vs forward")
            same_state(final_state, state, f"{name} final state, forward vs steps")
        # two chunks, the state handed over (an empty chunk when cut is 0 or the length)
        a, mid = ref(*[x[:, :cut] for x in xs], ref.weights, return_state=True)
        b, end = ref(*[x[:, cut:] for x in xs], ref.weights, state=mid, return_state=True)
        agree(whole, cat_time([a, b]), f"numpy chunks at {cut} vs one pass")
        same_state(final_ref, end, "numpy final state, chunked vs whole")
        a, mid = tm(*[t[:, :cut] for t in ts], return_state=True)
        b, end = tm(*[t[:, cut:] for t in ts], state=mid, return_state=True)
        agree(whole, cat_time([a, b]), f"torch chunks at {cut} vs one pass")
        same_state(final, end, "torch final state, chunked vs whole")


def same_state(a, b, what):
    a, b = flat_state(a), flat_state(b)
    assert a.keys() == b.keys(), f"{what}: keys {sorted(a)} vs {sorted(b)}"
    for k in a:
        agree(a[k], b[k], f"{what} ({k})")


def ir_text(path, params=None, source=None, header=True) -> str:
    """The elaborated IR without source locations (and without its header line)."""
    g = seqc.build_graph(str(path) if source is None else source, params)
    text = re.sub(r" ?\S+:\d+:\d+$", "", g.dump(), flags=re.M)
    if not header:
        text = text.split("\n", 1)[1]
    return text + repr(sorted(g.weight_shapes().items()))


def check_fmt(files: dict[str, str], directory: str, relaid: dict[str, str] | None = None):
    """format -> parse -> format is a fixed point, keeps the AST and the IR; `relaid` holds the
    same files laid out differently, which must format to the same text."""
    formatted = {}
    for name, text in files.items():
        module = seqc.parse(text, name)
        once = format_module(module)
        if relaid is not None:
            assert format_module(seqc.parse(relaid[name], name)) == once, \
                f"{name}: a different layout of the same program formats differently:\n{relaid[name]}"
        back = seqc.parse(once, name)
        assert back.items == module.items and repr(back.items) == repr(module.items), \
            f"{name}: the formatted text parses to another AST:\n{once}"
        assert format_module(back) == once, f"{name}: formatting is not a fixed point:\n{once}"
        formatted[name] = once
    out = os.path.join(directory, "formatted")
    os.makedirs(out, exist_ok=True)
    for name, text in formatted.items():
        Path(out, name).write_text(text)
    assert ir_text(Path(out, MAIN)) == ir_text(Path(directory, MAIN)), "the formatted files elaborate differently"


# -- the properties ------------------------------------------------------------------------------

def _written(spec):
    note(f"spec (features: {', '.join(sorted(spec.features))}):\n{spec}")
    d = tempfile.TemporaryDirectory(prefix="seqc-fuzz-")
    return d, spec.write(d.name)


@fuzz_settings(12)
@given(specs(), st.integers(1, 2), LENGTHS)
def test_numpy_and_torch_agree(spec, batch, length):
    d, path = _written(spec)
    with d:
        check_backends(path, batch, length)


@fuzz_settings(10)
@given(specs(), st.sampled_from([("conv", "scan"), ("scan", "recurrent"), ("conv", "recurrent"),
                                 ("auto", "recurrent")]), LENGTHS)
def test_torch_plans_agree_with_gradients(spec, modes, length):
    d, path = _written(spec)
    with d:
        check_plans(path, modes, length=length)


@fuzz_settings(12)
@given(specs(), st.integers(1, 2), LENGTHS, st.sampled_from(MODES), st.data())
def test_step_and_chunks_equal_forward(spec, batch, length, mode, data):
    cut = data.draw(st.integers(0, length), label="cut")
    d, path = _written(spec)
    with d:
        check_faces(path, cut, batch, length, mode)


@fuzz_settings(40)
@given(specs(), st.lists(st.integers(0, 3), min_size=64, max_size=64))
def test_fmt_round_trip(spec, layout):
    relaid = {name: noisy(text, itertools.cycle(layout)) for name, text in spec.files.items()}
    note("relaid:\n" + "\n".join(relaid.values()))
    d, _ = _written(spec)
    with d:
        check_fmt(spec.files, d.name, relaid)


@fuzz_settings(40)
@given(specs(), st.data())
def test_parameter_overrides_and_source_text(spec, data):
    """Overriding the model's parameters with their own values (as Python numbers, integral
    floats or command-line text) elaborates to the same IR; so does the main file given as
    source text instead of a path, when it includes only the standard library."""
    d, path = _written(spec)
    with d:
        want = ir_text(path, header=False)     # the header shows parameter values as written (1 or 1.0)
        given_ = {}
        for name, value in spec.params.items():
            form = data.draw(st.sampled_from(["int", "float", "text", "expr", "none"]), label=name)
            if form != "none":
                given_[name] = {"int": value, "float": float(value), "text": str(value),
                                "expr": f"{value + 1} - 1"}[form]
        note(f"params={given_}")
        assert ir_text(path, given_, header=False) == want
        if len(spec.files) == 1:
            assert ir_text(None, source=spec.files[MAIN], header=False) == want


@fuzz_settings(40)
@given(specs(), st.data())
def test_mutations_raise_located_errors(spec, data):
    sites = [s for s in spec.sites if s.kind not in KNOWN_BROKEN_KINDS]
    assume(sites)
    site = data.draw(st.sampled_from(sites), label="site")
    files = spec.mutated(site)
    note(f"mutation {site.kind} at {site.file}:{site.line}: {site.old!r} -> {site.new!r}\n"
         f"{files[site.file]}")
    with tempfile.TemporaryDirectory(prefix="seqc-fuzz-") as d:
        path = spec.write(d, files)
        with pytest.raises(seqc.SeqcError) as info:
            if site.stage == "build":
                seqc.build_graph(path)
            else:
                seqc.build_graph(path)      # still valid as a program ...
                seqc.compile(path, backend="torch")   # ... but not for a backend
        err = info.value
        text = str(err)
        assert ERROR_FORM.match(text), text
        assert err.filename and os.path.basename(err.filename) in files, text
        n_lines = files[os.path.basename(err.filename)].count("\n") + 1
        assert 1 <= err.line <= n_lines and err.column >= 1, text
        if site.kind in ("unknown name", "bad attribute value", "illegal plan", "dt range"):
            assert (os.path.basename(err.filename), err.line) == (site.file, site.line), text
        assert err.render().startswith(text)
    # the formatter is syntax only: a program that parses still round-trips
    for name, text in files.items():
        try:
            module = seqc.parse(text, name)
        except seqc.SeqcError:
            continue
        once = format_module(module)
        assert format_module(seqc.parse(once, name)) == once


def test_the_generator_covers_every_op_and_form():
    """Over a fixed sample, the generated programs use every op of the registry and every
    language form the fuzzer promises (so a new op without a generator shows up here)."""
    from seqc.registry import OPS
    drawn = []

    @settings(max_examples=500, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(specs())
    def collect(spec):
        drawn.append(spec)
    collect()
    ops, features = set(), set()
    for spec in drawn:
        features |= spec.features
        with tempfile.TemporaryDirectory() as d:
            ops |= {n.op for n in seqc.build_graph(spec.write(d)).order()}
    assert set(OPS) <= ops, f"ops never generated: {sorted(set(OPS) - ops)}"
    forms = {"block", "block-reused", "block-two-inputs", "block-two-outputs", "as-self", "as-name", "repeat",
             "repeat-0", "sibling-file", "std-MambaBlock", "std-TransformerBlock", "param-arithmetic",
             "two-inputs", "two-outputs", "selective_ssm-z", "linear-init-mamba_dt", "long-names",
             "op-named-value", "inline-activation", "tie-embedding", "tie-linear", "bidirectional",
             "attention-rope", "attention-kv_heads", "attention-head_dim", "attention-window", "attention-causal",
             "rglru-noreset"}
    assert forms <= features, f"forms never generated: {sorted(forms - features)}"
    sites = {s.kind for spec in drawn for s in spec.sites}
    assert sites >= {"unknown name", "bad attribute value", "wrong dimension", "illegal plan", "dt range"}


# -- the regressions it found ----------------------------------------------------------------------

# file name -> the diagnosis of a defect not fixed yet (the test must fail until it is)
XFAIL: dict[str, str] = {
}


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name, marks=[pytest.mark.xfail(strict=True, reason=XFAIL[p.name])]
                                               if p.name in XFAIL else []) for p in REGRESSIONS])
def test_regressions_from_the_fuzzer(path):
    with tempfile.TemporaryDirectory(prefix="seqc-regression-") as d:
        main = Path(d, MAIN)
        main.write_text(path.read_text())
        check_backends(str(main))
        for cut in (0, 3):          # an empty first chunk, and a cut inside the sequence
            check_faces(str(main), cut=cut)
        for modes in (("conv", "scan"), ("scan", "recurrent")):
            check_plans(str(main), modes)
        check_fmt({MAIN: path.read_text()}, d)


# invalid programs: file name -> the diagnosis of a defect not fixed yet (the test must fail until it is)
XFAIL_INVALID: dict[str, str] = {}


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name, marks=[pytest.mark.xfail(strict=True,
                                                                                      reason=XFAIL_INVALID[p.name])]
                                               if p.name in XFAIL_INVALID else []) for p in INVALID])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_invalid_regressions_from_the_fuzzer(path, backend):
    """Each file is invalid; compiling it raises a SeqcError located on the line marked '# error'."""
    lines = path.read_text().split("\n")
    line = next(k for k, text in enumerate(lines, 1) if text.rstrip().endswith("# error"))
    with pytest.raises(seqc.SeqcError) as info:
        seqc.compile(str(path), backend=backend)
    assert (info.value.filename, info.value.line) == (str(path), line), str(info.value)
    assert ERROR_FORM.match(str(info.value))
