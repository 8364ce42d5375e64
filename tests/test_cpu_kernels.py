"""The generated CPU kernels: their source, the on-disk cache (cold / warm, damaged,
unwritable), torch's thread count, and every discretization against the loop oracle.

Cache behaviour is tested in fresh interpreters (``SEQC_CACHE_DIR`` pointing at
a temporary directory), since a process keeps the kernels it compiled."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from seqc import discretization as disc
from seqc.backends.torch import cpu_kernels, scan

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="no numba")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import json, sys, torch
torch.set_num_threads(1)
from seqc.backends.torch import scan
g = torch.Generator().manual_seed(0)
r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
u, delta, A, B, C = r(1, 9, 16), r(1, 9, 16), -torch.exp(r(16, 4)), r(1, 9, 4), r(1, 9, 4)
engine = type(scan._pick_engine(u, "mamba", None, {"delta_softplus": True})).__name__
y = scan.selective_scan(u, delta, A, B, C, chunk=4)
threads = torch.get_num_threads()
import os; os.environ["SEQC_NO_NUMBA"] = "1"
ref = scan.selective_scan(u, delta, A, B, C, chunk=4)
print(json.dumps({"engine": engine, "threads": threads, "err": (y - ref).abs().max().item()}))
"""


def probe(cache_dir):
    env = dict(os.environ, SEQC_CACHE_DIR=str(cache_dir), SEQC_NO_NUMBA="0", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["engine"] == "_NumbaEngine" and result["err"] < 1e-12, result
    assert result["threads"] == 1, "a kernel call changed torch's thread count"
    return out.stderr


def test_cache_cold_warm_and_truncated_index(tmp_path):
    cold = probe(tmp_path)
    assert "seqc: compiling CPU kernels (once)" in cold
    sources = [f for f in os.listdir(tmp_path) if f.startswith("kernels_") and f.endswith(".py")]
    assert len(sources) == 1 and not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    indexes = [os.path.join(tmp_path, "__pycache__", f) for f in os.listdir(tmp_path / "__pycache__")
               if f.endswith(".nbi")]
    assert indexes
    assert "compiling" not in probe(tmp_path)          # warm: loaded from the cache, silently
    for path in indexes:                              # a run killed while writing the index
        with open(path, "r+b") as f:
            f.truncate(7)
    probe(tmp_path)                                   # recompiles; must not crash
    assert "compiling" not in probe(tmp_path)


def test_unwritable_cache_compiles_in_memory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    err = probe(blocker / "seqc")                     # makedirs fails: cannot be a cache
    assert "seqc: compiling CPU kernels (once)" in err


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("SEQC_CACHE_DIR", str(tmp_path / "x"))
    assert cpu_kernels.cache_dir() == str(tmp_path / "x")
    monkeypatch.delenv("SEQC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu_kernels.cache_dir() == str(tmp_path / "xdg" / "seqc")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cpu_kernels.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "seqc")


def test_generated_source_has_no_hand_written_discretization():
    for method in scan.DISCRETIZATIONS:
        program = disc.program("diag", method)
        src = cpu_kernels.generate(program, cache=True)
        prologue, _ = program.kernel.inline("numba", {"A_re": "A_re", "dt": "delta"}, prefix="_p")
        for line in prologue:
            assert line in src
        assert "_exp(" in src if method != "bilinear" else "_exp(" not in src
    mamba = cpu_kernels.generate(disc.program("diag", "mamba"), cache=True)
    assert "(_exp(A_re*delta))" in mamba and "dAn[j] += qa * (Abar*delta)" in mamba
    # softplus in the prologue through the vectorisable log1p, never libm's scalar call
    fused = cpu_kernels.generate(disc.program("diag", "mamba"), cache=False, flags={"delta_softplus": True})
    assert "_log1p(" in fused and "math.log1p" not in fused


@pytest.mark.parametrize("method", ["bilinear", "zoh", "mamba"])
def test_generated_kernels_gradcheck(method, monkeypatch):
    monkeypatch.setenv("SEQC_NO_NUMBA", "0")
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = dict(u=r(2, 7, 3), delta=r(2, 7, 3), A=-torch.exp(r(3, 2)), B=r(2, 7, 2), C=r(2, 7, 2),
                D=r(3), z=r(2, 7, 3), delta_bias=r(3) * 0.1, state=r(2, 3, 2))
    for v in args.values():
        v.requires_grad_()
    assert isinstance(scan._pick_engine(args["u"], method, None), scan._NumbaEngine)
    names = list(args)

    def f(*vals):
        return scan.selective_scan(**dict(zip(names, vals)), disc=method, return_state=True, chunk=3)

    assert torch.autograd.gradcheck(f, tuple(args.values()))
    # values against the torch engine (autograd of the same program)
    y, x = f(*args.values())
    monkeypatch.setenv("SEQC_NO_NUMBA", "1")
    y_ref, x_ref = f(*args.values())
    assert (y - y_ref).abs().max() < 1e-12 and (x - x_ref).abs().max() < 1e-12


CONCURRENT = r"""
import json, threading, torch, seqc
torch.set_num_threads(1)
torch.manual_seed(0)
model = seqc.compile("examples/mamba.seq", params={"d_model": 16, "n_layers": 2})
xs = [torch.randn(3, 40, 16) for _ in range(2)]

def fwd_bwd(x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.square().mean().backward()
    return y.detach(), x.grad

from seqc.backends.torch import cpu_kernels, scan
cpu_kernels.PARALLEL_MIN_WORK = 0             # the parallel kernels even at these small sizes
g = torch.Generator().manual_seed(1)
r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
args = [r(3, 50, 40), r(3, 50, 40), -torch.exp(r(40, 4)), r(3, 50, 4), r(3, 50, 4)]

def kernel_fwd_bwd():
    leaves = [a.clone().requires_grad_(True) for a in args]
    y = scan.selective_scan(*leaves, chunk=8)
    y.square().sum().backward()
    return [y.detach()] + [a.grad for a in leaves]

one = kernel_fwd_bwd()                      # one thread: every job in the calling thread
torch.set_num_threads(3)                    # the parallel twins, on numba's threads
three = kernel_fwd_bwd()
serial = [fwd_bwd(x) for x in xs]
out, errors = {}, []

def worker(i):
    try:
        out[i] = [fwd_bwd(xs[i]) for _ in range(4)]
    except BaseException as e:
        errors.append(repr(e))

threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
gap = lambda runs, ref: max(float((a - b).abs().max()) for run in runs for a, b in zip(run, ref))
print(json.dumps({"errors": errors, "runs": sum(map(len, out.values())), "threads": torch.get_num_threads(),
                  "split": gap([three], one),
                  "concurrent": max(gap(out[i], serial[i]) for i in out)}))
"""


@pytest.mark.parametrize("layer", ["workqueue", "default"])
def test_split_and_concurrent_launches_equal_one_thread(layer):
    """The parallel kernels (more than one thread) give exactly the serial kernels' result,
    values and gradients (a job left out or run twice would not), and two Python threads
    running forward+backward at once neither crash nor disturb each other: under numba's
    workqueue layer (which aborts the process on concurrent parallel launches) seqc
    serialises launches; torch's thread count is left as set."""
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer, NUMBA_NUM_THREADS="2", PYTHONPATH=ROOT)
    env.pop("SEQC_NO_NUMBA", None)
    out = subprocess.run([sys.executable, "-c", CONCURRENT], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=900)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-3000:]}"
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == [] and result["runs"] == 8, result
    assert result["split"] == 0.0 and result["threads"] == 3, result
    # torch's own ops (the model's linears) may reduce in another order when two threads share
    # its pool, so concurrent runs agree to float32 rounding (measured 5e-12), not bit for bit;
    # a workspace shared between the threads would be off by O(1)
    assert result["concurrent"] < 1e-6, result
