"""Cold start: from process start to the end of the first forward+backward of
examples/mamba.seq (d_model 32, 2 layers, batch 2, length 64, float32) in a
fresh process, with a cold kernel cache (a new, empty ``SEQC_CACHE_DIR``: numba
compiles the CPU kernels and ``seqc: compiling CPU kernels (once) ...`` is
printed) and then with the warm cache that run left (numba loads them).

Each run is a fresh ``python`` that reports, against the parent's clock, where
the time went: interpreter start-up, ``import torch``, ``import seqc``,
``seqc.compile`` of the spec, importing and setting up numba, the first forward
(which loads or compiles the forward kernel) and the first backward (the
adjoint kernel).  Targets: warm <= 3 s, cold <= 10 s.  The CPU time of each child process (user +
system, from the parent's rusage) is reported beside the wall time: on a shared
machine it is the figure that load does not inflate.

    python -m benchmarks.bench_cold_start [--repeat 3] [--threads N]
Writes cold_start.json (a temporary directory unless --save / --out).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
marks = [("start", time.time())]
def mark(name):
    marks.append((name, time.time()))
import torch
mark("import torch")
import seqc
mark("import seqc")
model = seqc.compile("examples/mamba.seq", params={"d_model": 32, "n_layers": 2})
mark("compile spec")
from seqc.backends.torch import cpu_kernels
cpu_kernels.numba_module()
mark("numba import+setup")
torch.manual_seed(0)
x = torch.randn(2, 64, 32, requires_grad=True)
y = model(x)
mark("first forward")
y.square().mean().backward()
mark("first backward")
heavy = [m for m in ("torch._dynamo", "sympy", "networkx", "lark", "scipy", "triton") if m in sys.modules]
print(json.dumps({"marks": marks, "loaded": heavy}))
"""

TARGET_S = {"warm": 3.0, "cold": 10.0}
MESSAGE = "compiling CPU kernels (once)"


def one_run(cache: str, threads: int) -> dict:
    """A fresh process against the kernel cache `cache`: phase durations (s), total, and
    whether the one-line compile message was printed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, SEQC_CACHE_DIR=cache, OMP_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads))
    env.pop("SEQC_NO_NUMBA", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=root)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    marks = rep["marks"]
    phases = {"interpreter start": marks[0][1] - t0}
    for (_, a), (name, b) in zip(marks, marks[1:]):
        phases[name] = b - a
    return {"phases_s": phases, "total_s": marks[-1][1] - t0, "process_wall_s": wall, "process_cpu_s": cpu,
            "message": MESSAGE in out.stderr, "stderr_lines": len(out.stderr.strip().splitlines()),
            "modules_loaded": rep["loaded"]}


def _load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split(" ")[0]
    except OSError:
        return "?"


def main():
    import argparse
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.common import add_output_options, save, set_output
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2, help="cold+warm pairs (each with a new cache)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS / NUMBA_NUM_THREADS of the runs")
    add_output_options(ap)
    args = ap.parse_args()
    set_output(args)
    runs = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="seqc-cold-") as cache:
            load = _load()
            cold = one_run(cache, args.threads)
            warm = one_run(cache, args.threads)
        runs.append({"cold": cold, "warm": warm, "load_before": load, "load_after": _load()})
        for kind, r in (("cold", cold), ("warm", warm)):
            phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases_s"].items())
            print(f"run {i + 1} {kind}: {r['total_s']:.2f} s, CPU {r['process_cpu_s']:.2f} s "
                  f"(target {TARGET_S[kind]:.0f} s; message {'shown' if r['message'] else 'not shown'}, "
                  f"{r['stderr_lines']} stderr line(s))\n    {phases}")
        print(f"    load average {runs[-1]['load_before']} before, {runs[-1]['load_after']} after; "
              f"heavy modules loaded: {', '.join(warm['modules_loaded']) or 'none'}")
    best = {k: min(r[k]["total_s"] for r in runs) for k in ("cold", "warm")}
    cpu = {k: min(r[k]["process_cpu_s"] for r in runs) for k in ("cold", "warm")}
    print(f"best of {args.repeat}: cold {best['cold']:.2f} s, warm {best['warm']:.2f} s; "
          f"CPU time of the process (whole, exit included) cold {cpu['cold']:.2f} s, warm {cpu['warm']:.2f} s "
          f"(threads {args.threads}, {os.cpu_count()} CPUs)")
    print("wrote", save("cold_start.json", {"runs": runs, "best_s": best, "threads": args.threads,
                                            "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
