"""Compile time: a 48-layer hybrid spec (examples/hybrid.seq, n_layers=48, i.e.
48 x (Mamba block + attention block + gated MLP)) from parse to a built torch
module, cold (a fresh process: first sympy derivations, first code generation)
and warm (the same process again: the first warm compile, and the median of five more -
a single compile can include a full cycle collection of everything the process holds, so
one sample swings between 0.18 and 0.45 s).  Import time is reported separately.

    python -m benchmarks.bench_compile
Writes benchmarks/results/compile.json.
"""
from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.common import add_output_options, save, set_output

CHILD = r"""
import json, time
t0 = time.perf_counter()
import seqc, torch
t1 = time.perf_counter()
phases = {}
g0 = time.perf_counter(); graph = seqc.build_graph("examples/hybrid.seq", {"n_layers": 48}); phases["parse+elaborate"] = time.perf_counter() - g0
p0 = time.perf_counter(); planned = seqc.compiler.plan_graph(graph); phases["passes"] = time.perf_counter() - p0
from seqc.init import init_weights
from seqc.backends.torch.module import build_module
w0 = time.perf_counter(); weights = init_weights(planned); phases["init weights"] = time.perf_counter() - w0
b0 = time.perf_counter(); model = build_module(planned, weights); phases["codegen+build"] = time.perf_counter() - b0
cold = time.perf_counter() - t1
warm = []
for _ in range(6):
    w = time.perf_counter(); seqc.compile("examples/hybrid.seq", params={"n_layers": 48}); warm.append(time.perf_counter() - w)
import statistics
print(json.dumps({"import_s": t1 - t0, "cold_s": cold, "warm_first_s": warm[0], "warm_s": statistics.median(warm[1:]),
                  "phases_cold_s": phases,
                  "nodes": len(graph.nodes), "parameters": sum(p.numel() for p in model.parameters())}))
"""


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_options(ap)
    set_output(ap.parse_args())
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["cold_s"])
    print(f"48-layer hybrid ({best['nodes']} IR nodes, {best['parameters'] / 1e6:.1f}M parameters): "
          f"import {best['import_s']:.2f} s, compile cold {best['cold_s']:.2f} s, warm {min(r['warm_s'] for r in runs):.2f} s "
          f"(median of five; the first warm compile {min(r['warm_first_s'] for r in runs):.2f} s)")
    print("  cold phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in best["phases_cold_s"].items()))
    print("wrote", save("compile.json", {"runs": runs}))


if __name__ == "__main__":
    main()
