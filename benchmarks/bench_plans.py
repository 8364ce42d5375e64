"""Validate the planner's cost model against measurement: time the S4D layer's
plans (FFT convolution, chunked scan, plain recurrence) over a sweep of
lengths and report the measured crossover next to the planner's prediction.

    python -m benchmarks.bench_plans [--lengths 16,64,...] [--batch 1] [--train] [--cpu-time] [--save | --out DIR]

The torch CPU machine model (backends/torch/backend.py) was fitted from this
benchmark's ``--cpu-time`` output at one thread (batch 1 and 8, forward and
``--train``): ns per element = time / the elements that ``seqc explain`` lists.
CPU time (not wall time) keeps the fit usable on a machine that other work shares.
With the generated recurrence kernel, ``scan`` and ``recurrent`` run the same
kernel: a measured winner among plans predicted to cost the same counts as agreement.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import seqc
from benchmarks.common import add_output_options, output_dir, set_output
from seqc.benchmark import median_ms
from seqc.passes import PlanContext
from seqc.backend import get_backend
from seqc.passes.planner import choose


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="examples/s4d.seq")
    ap.add_argument("--lengths", default="16,64,256,1024,4096,16384")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--train", action="store_true", help="time forward+backward instead of forward")
    ap.add_argument("--cpu-time", action="store_true", help="median process CPU time instead of wall time")
    add_output_options(ap)
    args = ap.parse_args()
    set_output(args)
    torch.manual_seed(0)
    lengths = [int(x) for x in args.lengths.split(",")]
    plans = ("conv", "scan", "recurrent")
    models = {p: seqc.compile(args.spec, backend="torch", mode=p) for p in plans}
    graph = seqc.build_graph(args.spec)
    node = next(n for n in graph.order() if n.op == "ssm")
    d = int(node.input_shapes[0][-1])
    rows = []
    print(f"{'L':>7} " + " ".join(f"{p + ' ms':>13}" for p in plans) + f" {'measured':>10} {'predicted':>10}")
    for L in lengths:
        x = torch.randn(args.batch, L, d, requires_grad=args.train)
        measured = {}
        for p in plans:
            if p == "recurrent" and L > 4096:
                continue
            m = models[p]

            def go():
                if args.train:
                    m(x).sum().backward()
                else:
                    with torch.no_grad():
                        m(x)
            measured[p] = median_ms(go, args.repeat if L <= 4096 else 2,
                                    clock=time.process_time if args.cpu_time else time.perf_counter)
        ctx = PlanContext(batch=args.batch, length=L, training=args.train)
        opts, best, _ = choose(node, ctx)
        mach = get_backend("torch").machine("cpu", "float32")
        predicted = {o.plan: o.seconds(mach) * 1e3 for o in opts if o.legal}
        winner = min(measured, key=measured.get)
        best_cost = predicted[best.plan]
        tied = {p for p, c in predicted.items() if c <= best_cost * (1 + 1e-9)}
        rows.append(dict(length=L, measured_ms=measured, predicted_ms=predicted, measured_winner=winner,
                         predicted_winner=best.plan, predicted_tied=sorted(tied)))
        print(f"{L:>7} " + " ".join(f"{measured.get(p, float('nan')):>13.3f}" for p in plans)
              + f" {winner:>10} {best.plan:>10}")
    agree = sum(r["measured_winner"] in r["predicted_tied"] for r in rows)
    print(f"planner picked the measured winner at {agree}/{len(rows)} lengths")
    path = os.path.join(output_dir(), "plans_train.json" if args.train else "plans.json")
    with open(path, "w") as f:
        json.dump(dict(spec=args.spec, batch=args.batch, train=args.train, rows=rows), f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
