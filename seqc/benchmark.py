"""`seqc bench`: time a compiled spec per plan - forward and forward+backward
(interleaved, same warm-up and repeats, median with min and max) and per-token
decoding - with a progress line on stderr and a table."""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from .compiler import compile, plan_graph
from .inputs import as_list, random_inputs


def median_ms(fn, repeat=5, warmup=1, clock=time.perf_counter):
    """Median time of `fn` in milliseconds, after `warmup` calls: wall time, or the
    process's CPU time with ``clock=time.process_time``."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return statistics.median(out) * 1e3


def spread_ms(fns: dict, repeat=5, warmup=1) -> dict:
    """{name: {"min", "median", "max"}} wall times in ms of several functions timed
    interleaved (each round calls every function once, so warm-up, drift and caches
    treat them alike), after the same ``warmup`` rounds for all."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"min": min(v), "median": statistics.median(v), "max": max(v)} for k, v in times.items()}


def _progress(i, total, label):
    if not sys.stderr.isatty():
        return
    width = 24
    done = int(width * i / total)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{total} {label:<40}")
    sys.stderr.flush()
    if i == total:
        sys.stderr.write("\n")


def _plans_present(spec, params, backend, modes, length, batch):
    """Modes that change at least one layer's plan (skip duplicates of auto)."""
    seen, keep = {}, []
    for mode in modes:
        g = plan_graph(spec, backend, params, mode, length=length, batch=batch)
        sig = tuple(n.meta.get("plan") for n in g.order())
        if sig not in seen.values():
            seen[mode] = sig
            keep.append(mode)
    return keep


def bench(spec, params=None, *, backend="torch", length=1024, batch=2, repeat=3, steps=32,
          modes=("auto", "conv", "scan", "recurrent")):
    from .backend import get_backend
    be = get_backend(backend)
    modes = _plans_present(spec, params, backend, modes, length, batch)
    rows = []
    total = len(modes) * 3
    k = 0
    for mode in modes:
        model = compile(spec, backend=backend, params=params, mode=mode, length=length, batch=batch)
        g = model.graph
        (x,) = be.inputs(model, random_inputs(g, batch, length, np.random.default_rng(0)))
        plans = ",".join(sorted({str(m.meta["plan"]) for m in g.order() if "plan" in m.meta})) or "-"
        row = {"mode": mode, "plans": plans}
        _progress(k, total, f"{mode}: forward, forward+backward")

        def forward():
            with be.inference():
                model(x)
        fns = {"forward": forward}
        if be.autograd:
            fns["fwd_bwd"] = lambda: be.backward(model, model(x))
        t = spread_ms(fns, repeat, warmup=2)
        for key in ("forward", "fwd_bwd"):
            for stat in ("min", "median", "max"):
                row[f"{key}_{stat}_ms"] = t[key][stat] if key in t else float("nan")
            row[f"{key}_ms"] = row[f"{key}_median_ms"]
        k += 2
        _progress(k, total, f"{mode}: step")

        def decode():
            state = model.init_state(batch)
            for t in range(min(steps, length)):
                _, state = model.step(x[:, t], state=state)
        with be.inference():
            row["step_ms"] = median_ms(decode, max(1, repeat // 2)) / min(steps, length)
        k += 1
        _progress(k, total, f"{mode}: done")
        rows.append(row)
    return rows


def table(rows) -> str:
    """Median (min-max) per mode; forward and forward+backward were timed interleaved with
    the same warm-up and repeats."""
    def cell(r, key):
        return f"{r[key + '_median_ms']:.2f} ({r[key + '_min_ms']:.2f}-{r[key + '_max_ms']:.2f})"
    head = (f"{'mode':<10} {'plans':<16} {'forward ms median (min-max)':>30} {'fwd+bwd ms median (min-max)':>30} "
            f"{'step ms/token':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['mode']:<10} {r['plans']:<16} {cell(r, 'forward'):>30} {cell(r, 'fwd_bwd'):>30} "
                     f"{r['step_ms']:>14.3f}")
    return "\n".join(lines)
