"""Hostile and careless inputs, each run as a real `seqc` process (or a small
Python program) in its own subprocess, with a timeout and, where memory is the
point, an address-space limit.  Every case asserts the exit status (2 for a
user's mistake: never 3, never a traceback), the located message, that no
byte of a non-spec file is echoed, and that nothing was overwritten.

Specs and checkpoint files are generated in a temporary directory when the
module runs.  One helper process (``forkrun.py``) imports seqc and torch once
and forks a fresh child per case, so each case is still its own process (own
limits, own timeout, killed if it hangs) without paying an interpreter start
per case.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not os.path.exists("/proc/self/statm"),
                                reason="the corpus runner forks and reads /proc (Linux)")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECRET = "seqc-hostile-secret-7f3a9"      # planted in files and the environment; must never be printed
TIMEOUT = 60


@dataclass
class Case:
    argv: list | None = None        # seqc arguments (a CLI case)
    rc: int = 2
    stderr: str | None = None       # a regex the (error) output must match
    stdout: str | None = None
    stdin: bytes | None = None
    memory: int | None = None       # RLIMIT_AS headroom in bytes, above what the runner already maps
    code: str | None = None         # a Python snippet (an API case) instead of argv
    unchanged: list = field(default_factory=list)    # files that must be byte-identical afterwards
    env: dict = field(default_factory=dict)
    timeout: float = 30


PRELUDE = """
import json, struct, torch, numpy, seqc
from seqc.interop import from_mamba_ssm
from mambapy.mamba import Mamba, MambaConfig
torch.set_num_threads(1)
torch.manual_seed(0)
sd = Mamba(MambaConfig(d_model=8, n_layers=1, d_state=4, expand_factor=2, d_conv=4)).state_dict()

def raw_safetensors(path, entries, data=b""):
    h = json.dumps(entries).encode()
    open(path, "wb").write(struct.pack("<Q", len(h)) + h + data)

def attempt(what):
    try:
        from_mamba_ssm(what)
        print("LOADED")
    except seqc.SeqcError as e:
        print("SeqcError:", e)
"""


def run_cases(cases: dict, cwd: str) -> dict:
    request = {"prelude": PRELUDE, "cases": [
        {"name": n, "kind": "python" if c.code else "cli", "argv": c.argv, "code": c.code,
         "stdin": (c.stdin or b"").decode("latin-1"), "memory": c.memory, "env": c.env, "timeout": c.timeout,
         "cwd": cwd, "unset": ["SEQC_DEBUG"]} for n, c in cases.items()]}
    env = dict(os.environ, SEQC_HOSTILE_TOKEN=SECRET, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "forkrun.py")], cwd=cwd,
                          env=env, input=json.dumps(request).encode(), capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return json.loads(done.stdout)


def w(path, text, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(text)
    return path


MODEL = "model M(d = 8) {{\n  input x: [B, L, d]\n{body}\n}}\n"


def model(body):
    return MODEL.format(body=textwrap.indent(textwrap.dedent(body).strip("\n"), "  "))


def _build(tmp) -> dict[str, Case]:
    j = lambda *p: os.path.join(tmp, *p)   # noqa: E731
    secret_file = w(j("private", "secret.txt"), f"TOKEN={SECRET}\nmore {SECRET}\n")
    w(j("private", "secret.seq"), f"model Secret() {{\n  input x: [B, L, 4]\n  return x\n}}\n# {SECRET}\n")
    w(j("proj", "lib", "blocks.seq"), "block Id() {\n  input x: [B, L, 8]\n  return x\n}\n")
    w(j("proj", "common.seq"), "block Shared() {\n  input x: [B, L, 8]\n  return x\n}\n")
    os.symlink(secret_file, j("proj", "sub", "evil.seq")) if os.makedirs(j("proj", "sub"), exist_ok=True) is None \
        else None
    inc = lambda path, extra="": w(j("proj", "sub", f"inc{abs(hash(path)) % 10**8}.seq"),  # noqa: E731
                                   f'include "{path}"\n' + model("return x") + extra)
    cases: dict[str, Case] = {}
    # -- security: includes stay inside their roots and never echo other files
    cases["include_etc_passwd"] = Case(["check", inc("/etc/passwd")], stderr=r":1:1: error: cannot include "
                                       r"'/etc/passwd': only \.seq files")
    cases["include_proc_environ"] = Case(["check", inc("/proc/self/environ")], stderr=r"only \.seq files")
    cases["include_secret_txt_relative"] = Case(["check", inc("../../private/secret.txt")], stderr="only .seq")
    cases["include_std_escape"] = Case(["check", inc("std/../../../../etc/hostname")], stderr="only .seq")
    cases["include_std_escape_seq"] = Case(["check", inc("std/../../../../" + j("private", "secret.seq")[1:])],
                                           stderr="leaves seqc's standard library")
    cases["include_dotdot_outside"] = Case(["check", inc("../../private/secret.seq")],
                                           stderr=r"outside the include roots; pass its directory with -I DIR")
    cases["include_absolute"] = Case(["check", inc(j("private", "secret.seq"))], stderr="an absolute path is outside")
    cases["include_symlink_out"] = Case(["check", inc("evil.seq")], stderr="outside the include roots")
    cases["include_dotdot_with_I"] = Case(["check", inc("../common.seq"), "-I", j("proj")], rc=0, stdout=": ok:")
    cases["include_search_path"] = Case(["check", inc("blocks.seq"), "-I", j("proj", "lib")], rc=0, stdout=": ok")
    cases["include_opt_in"] = Case(["check", inc(j("proj", "common.seq")), "--allow-any-include"], rc=0,
                                   stdout=": ok")
    cases["include_missing"] = Case(["check", inc("nothere.seq")], stderr=r":1:1: error: cannot include "
                                    r"'nothere.seq': no such file")
    cases["include_directory"] = Case(["check", inc("lib.seq/")], stderr="only .seq")
    cases["main_is_etc_passwd"] = Case(["check", "/etc/passwd"], stderr=r"^/etc/passwd:1:\d+: error: not a \.seq "
                                       r"spec: it does not parse \(its text is not shown")
    cases["main_secret_txt"] = Case(["check", secret_file], stderr="its text is not shown")
    cases["control_chars_shown_escaped"] = Case(["check", w(j("ctl.seq"), model("y = x \x1b[2J\x1b[31m\n"
                                                                                "return y"))],
                                                stderr=r"unexpected control character '\\x1b'[\s\S]*\\x1b\[2J")
    cases["bidi_override_shown_escaped"] = Case(["check", w(j("bidi.seq"), model("y = x \u202e# z\nreturn q"))],
                                                stderr=r"unexpected character '\\u202e'\n  y = x \\u202e# z\n"
                                                       r"        \^~~~~~$")
    cases["stdin_spec"] = Case(["check", "-"], rc=0, stdin=model("return x").encode(), stdout="<stdin>: ok")
    cases["stdin_error_located"] = Case(["check", "-"], stdin=model("return y").encode(),
                                        stderr=r"^<stdin>:3:10: error: undefined name 'y'")
    cases["file_argument_is_a_file"] = Case(["check", "model"], stderr=r"^model: error: cannot read file: (?i:no such)")
    # -- hangs and blow-ups: refused fast, with the limit named
    nest = ("block A() {\n  input x: [B, L, 8]\n  return x\n}\n"
            "block Bk() {\n  input x: [B, L, 8]\n  y = repeat(4096) A(x)\n  return y\n}\n"
            "block C() {\n  input x: [B, L, 8]\n  y = repeat(4096) Bk(x)\n  return y\n}\n"
            "model M() {\n  input x: [B, L, 8]\n  y = repeat(4096) C(x)\n  return y\n}\n")
    cases["repeat_nested_no_nodes"] = Case(["check", w(j("nest.seq"), nest)], stderr=r"more than 200,000 steps.*"
                                           r"SEQC_MAX_NODES")
    chain = "block B0() {\n  input x: [B, L, 8]\n  return x\n}\n" + "".join(
        f"block B{i}() {{\n  input x: [B, L, 8]\n  y = B{i - 1}(x)\n  z = B{i - 1}(y)\n  return z\n}}\n"
        for i in range(1, 31)) + "model M() {\n  input x: [B, L, 8]\n  y = B30(x)\n  return y\n}\n"
    cases["block_doubling_chain"] = Case(["check", w(j("chain.seq"), chain)], stderr=r":\d+:\d+: error: .*"
                                         r"SEQC_MAX_NODES")
    cases["raise_node_limit"] = Case(["check", w(j("chain2.seq"), chain.replace("range", "range"))],
                                     env={"SEQC_MAX_NODES": "50"}, stderr="more than 50 steps")
    floor20 = "L" + " // 2" * 20
    cases["floor_chain_shape"] = Case(["check", w(j("floor.seq"), "model M(d = 8) {\n  input x: [B, L, d]\n"
                                                  f"  input y: [B, {floor20}, d]\n  z = x + y\n  return z\n}}\n")],
                                      stderr=r":4:7: error: '\+'.*floor\(L/1048576\)")
    big = " + ".join(f"(L + {k}) * (L - {k})" for k in range(40))
    cases["huge_shape_expression"] = Case(["check", w(j("bigexpr.seq"), "model M(d = 8) {\n  input x: [B, L, d]\n"
                                                      f"  input y: [B, {big}, d]\n  return y\n}}\n")],
                                          stderr=r"shape expression too complex.*SEQC_MAX_DIM_OPS")
    fifo = j("fifo.seq")
    os.mkfifo(fifo)
    cases["fifo_spec"] = Case(["check", fifo], stderr=r"fifo\.seq: error: cannot read file: it is a FIFO")
    cases["dev_zero"] = Case(["check", "/dev/zero"], stderr=r"^/dev/zero: error: cannot read file: it is a device")
    cases["directory_spec"] = Case(["check", j("proj")], stderr="it is a directory")
    sparse = j("huge.seq")
    with open(sparse, "wb") as f:
        f.truncate(3 * 2 ** 30)      # 3 GB, sparse: stat says so, reading would take it all
    cases["huge_file_checked_before_read"] = Case(["check", sparse], memory=2 * 2 ** 30,
                                                  stderr=r"too large \(3221225472 bytes; at most 4000000; set "
                                                         r"SEQC_MAX_SPEC_BYTES")
    cases["huge_stdin"] = Case(["check", "-"], stdin=b"#" * 4_000_001, stderr="<stdin>: error: spec on standard "
                                                                              "input is too large")
    giant = w(j("giant.seq"), "model M(d = 50000) {\n  input x: [B, L, d]\n  y = linear(x, d)\n"
                              "  z = linear(y, d)\n  return z\n}\n")
    cases["giant_run_refused"] = Case(["run", giant], memory=6 * 2 ** 30,
                                      stderr=r"needs about 18\.7 GiB \(weights 18\.6 GiB.*--max-memory")
    cases["giant_check_estimates"] = Case(["check", giant], rc=0, stdout=r"weights 18\.6 GiB")
    small = w(j("small.seq"), model("y = linear(x, d)\nreturn y"))
    cases["run_huge_length"] = Case(["run", small, "-L", "10000000000"], stderr=r"small\.seq: error: this run needs about "
                                                                                r"1\.2 TiB .*length 10000000000")
    cases["run_absurd_length"] = Case(["run", small, "-L", "10" * 10], stderr=r"--length 10101010101010101010 is too "
                                                                              r"large")
    cases["run_long_length_memory"] = Case(["run", small, "-L", "1000000000"], memory=6 * 2 ** 30,
                                           stderr=r"needs about .* GiB.*more than the limit")
    # -- crashes that must be errors
    cases["ceil_1e300"] = Case(["check", w(j("ceil.seq"), model("y = linear(x, ceil(1e300))\nreturn y"))],
                               stderr=r":3:17: error: 'ceil' gives 1e\+300, too large for a size")
    cases["negative_length"] = Case(["run", small, "--length", "-5"], stderr=r"^[^\n]*small\.seq: error: --length "
                                                                              r"must be a positive integer, got -5\n$")
    cases["graph_negative_length"] = Case(["graph", small, "--planned", "--length", "-5"], stderr="--length must be")
    cases["negative_max_memory"] = Case(["run", small, "--max-memory", "-1"], stderr="--max-memory must be a positive number")
    cases["negative_seed"] = Case(["run", small, "--seed", "-1"], stderr=r"--seed must be a non-negative")
    cases["bench_numpy"] = Case(["bench", small, "--backend", "numpy"], stderr="needs an autograd backend")
    cases["model_named_debug"] = Case(["check", w(j("dbg.seq"), "model __debug__() {\n  input x: [B, L, 4]\n"
                                                                "  return x\n}\n")],
                                      stderr=r":1:1: error: '__debug__' cannot name a model")
    cases["difftest_nan_tolerance"] = Case(["difftest", small, "--tolerance", "nan"], stderr="tolerance must be a positive finite number")
    # -- data loss
    spec = w(j("keep.seq"), model("y = linear(x, d)  # keep me\nreturn y"))
    cases["dot_over_spec"] = Case(["graph", spec, "--dot", spec], stderr="would overwrite the spec itself",
                                  unchanged=[spec])
    other = w(j("other.dot"), "precious\n")
    cases["dot_over_existing"] = Case(["graph", spec, "--dot", other], stderr="exists; pass --force",
                                      unchanged=[other, spec])
    cases["param_with_newline"] = Case(["check", spec, "-p", "d=1\n}\nmodel X() {"], stderr="several lines")
    cases["param_with_brace"] = Case(["check", spec, "-p", "d=1 }"], stderr=r"'\}' cannot appear")
    # -- CLI rough edges
    cases["version"] = Case(["--version"], rc=0, stdout=r"^seqc \d+\.\d+")
    cases["typo_input_dim"] = Case(["check", w(j("typo.seq"), "model M(d_model = 8) {\n  input x: [B, L, d_modle]\n"
                                                              "  return x\n}\n")],
                                   stderr=r":2:19: error: unknown name 'd_modle' in the shape of input 'x' \(did you "
                                          r"mean 'd_model'\?\)")
    cases["third_free_symbol"] = Case(["check", w(j("third.seq"), "model M() {\n  input x: [B, L, H]\n"
                                                                  "  return x\n}\n")],
                                      stderr=r":2:19: error: unknown name 'H' in the shape of input 'x': "
                                             r"the model already has the free size symbols B, L")
    cases["unused_layer_warns"] = Case(["check", w(j("unused.seq"), model("y = linear(x, d)\nz = linear(x, d)\n"
                                                                          "return y"))],
                                       rc=0, stderr=r"unused\.seq:4:7: warning: the result of 'linear' layer 'z' is "
                                                    r"never used")
    cases["std_paths_in_dump"] = Case(["graph", os.path.join(ROOT, "examples", "mamba.seq")], rc=0,
                                      stdout=r"# layers\.0\.mixer\.in_proj std/mamba_block\.seq:\d+:\d+")
    cases["run_labelled_time"] = Case(["run", small, "-L", "8"], rc=0,
                                      stdout=r"model M on torch:[\s\S]*forward \d+\.\d ms \(first call")
    # -- Python API
    py = lambda src, **kw: Case(code=textwrap.dedent(src), **kw)  # noqa: E731
    cases["api_params_not_dict"] = py(f"""
        import seqc
        try:
            seqc.build_graph({small!r}, params="abc")
        except seqc.SeqcError as e:
            print("SeqcError:", e)
        """, rc=0, stdout="SeqcError: .*params must be a dict")
    cases["api_str_names_non_spec_file"] = py(f"""
        import warnings, seqc
        warnings.simplefilter("error", DeprecationWarning)
        try:
            seqc.build_graph({secret_file!r})
        except DeprecationWarning as e:
            print("deprecated:", "pathlib.Path" in str(e))
        try:
            seqc.build_graph(path={secret_file!r})
        except seqc.SeqcError as e:
            print("SeqcError:", e.render())
        """, rc=0, stdout=r"deprecated: True\nSeqcError: .*not a \.seq spec")
    cases["api_include_paths"] = py(f"""
        import seqc
        src = 'include "blocks.seq"\\n' + {model("y = Id(x)").replace("input x", "input x")!r}.replace("return x", "")
        try:
            seqc.build_graph(source=src)
        except seqc.SeqcError as e:
            print("refused:", e)
        g = seqc.build_graph(source=src.replace("Id(x)", "Id(x)\\n  return y"), include_paths=[{j("proj", "lib")!r}])
        print("ok", g.name)
        """, rc=0, stdout=r"refused: .*no such file[\s\S]*ok M")
    cases["api_complex_input"] = py(f"""
        import torch, seqc
        m = seqc.compile({small!r})
        try:
            m(torch.zeros(1, 3, 8, dtype=torch.complex64))
        except seqc.SeqcError as e:
            print("SeqcError:", e)
        """, rc=0, stdout="SeqcError: .*complex")
    return cases


def _checkpoint_cases(tmp) -> dict[str, Case]:
    """Checkpoints built in the subprocess (they need torch), each loaded by from_mamba_ssm."""
    j = lambda *p: os.path.join(tmp, *p)   # noqa: E731
    def ck(body, pattern, memory=None):
        return Case(code=textwrap.dedent(body), rc=0, stdout=rf"SeqcError: .*{pattern}", memory=memory)
    st = j("ck.safetensors")
    return {
        "ckpt_truncated_safetensors": ck(f"""
            from safetensors.torch import save_file
            save_file({{k: v.contiguous() for k, v in sd.items()}}, {st!r})
            data = open({st!r}, "rb").read(); open({st!r}, "wb").write(data[:len(data) // 2])
            attempt({st!r})""", "truncated or corrupt"),
        "ckpt_garbage_safetensors": ck(f"""
            open({st!r}, "wb").write(b"\\xff" * 64); attempt({st!r})""", "not a valid safetensors file"),
        "ckpt_garbage_pt": ck(f"""
            open({j('g.pt')!r}, "wb").write(b"PK\\x03\\x04 garbage" * 10); attempt({j('g.pt')!r})""",
                              "cannot read checkpoint"),
        "ckpt_zero_by_million": ck(f"""
            raw_safetensors({st!r}, {{"layers.0.mixer.in_proj.weight": {{"dtype": "F32", "shape": [0, 1000000],
                                     "data_offsets": [0, 0]}}}})
            attempt({st!r})""", "empty shape", memory=3 * 2 ** 30),
        "ckpt_declares_huge_tensor": ck(f"""
            raw_safetensors({st!r}, {{"a": {{"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 16]}}}},
                            b"0" * 16)
            attempt({st!r})""", "declares shape", memory=3 * 2 ** 30),
        "ckpt_huge_config_from_shapes": ck("""
            bad = dict(sd); bad["layers.0.mixer.A_log"] = torch.zeros(100000, 4)
            bad["layers.0.mixer.in_proj.weight"] = torch.zeros(200000, 8)
            attempt(bad)""", r"'layers.0.mixer.conv1d.weight' has shape \(16, 1, 4\), but seqc's Mamba with this "
                             r"configuration needs \(100000, 1, 4\)"),
        "ckpt_wrong_rank": ck("""
            bad = dict(sd); bad["layers.0.mixer.A_log"] = torch.zeros(16); attempt(bad)""", "2 dimensions"),
        "ckpt_non_tensor_value": ck("""
            bad = dict(sd); bad["layers.0.mixer.D"] = [1.0, 2.0]; attempt(bad)""", "is a list, not a tensor"),
        "ckpt_non_string_key": ck("""
            bad = dict(sd); bad[7] = torch.zeros(1); attempt(bad)""", "keys must be strings"),
        "ckpt_meta_tensor": ck("""
            bad = dict(sd); bad["layers.0.mixer.D"] = torch.empty(16, device="meta"); attempt(bad)""", "meta"),
        "ckpt_unknown_keys": ck("""
            bad = dict(sd); bad["layers.0.mixer.extra_gate"] = torch.zeros(2); bad["zzz"] = torch.zeros(1)
            attempt(bad)""", "2 key.* does not: 'layers.0.mixer.extra_gate', 'zzz'"),
        "ckpt_not_a_dict": ck("""attempt(42)""", "expected a state_dict"),
        "ckpt_complex_tensor": ck("""
            bad = dict(sd); bad["layers.0.mixer.D"] = torch.zeros(16, dtype=torch.complex64); attempt(bad)""",
                                  "real floating point"),
    }


def _all(tmp) -> dict:
    return {**_build(tmp), **_checkpoint_cases(tmp)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("hostile"))
    cases = _all(tmp)
    before = {n: {p: open(p, "rb").read() for p in c.unchanged} for n, c in cases.items()}
    got = run_cases(cases, tmp)
    return {n: (cases[n], got[n], before[n]) for n in cases}


def _names():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        return sorted(_all(d))


@pytest.mark.parametrize("name", _names())
def test_hostile(results, name):
    case, got, before = results[name]
    rc, out, err = got["rc"], got["stdout"], got["stderr"]
    shown = f"\n--- rc {rc} ({got['seconds']} s)\n--- stdout\n{out[-2000:]}\n--- stderr\n{err[-2000:]}"
    assert rc is not None, "timed out" + shown
    assert rc == case.rc, shown
    assert "Traceback" not in err and "internal error" not in err, shown
    assert SECRET not in out + err, "a secret leaked" + shown
    assert "root:x:" not in out + err, shown
    assert "\x1b" not in out + err and "\u202e" not in out + err, "raw control characters printed" + shown
    if case.stderr:
        assert re.search(case.stderr, err, re.M), shown
    if case.stdout:
        assert re.search(case.stdout, out, re.M), shown
    for path, data in before.items():
        with open(path, "rb") as f:
            assert f.read() == data, f"{path} was modified"
