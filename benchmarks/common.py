"""Benchmark helpers: median timing, peak-memory measurement in a fresh
subprocess, and JSON output."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from seqc.benchmark import median_ms  # noqa: F401  (one timer for `seqc bench` and these scripts)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def compare_ms(fa, fb, repeat=7):
    """Median ms of two functions timed alternately (so drift and warm caches hit both alike)."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(repeat):
        for f, out in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_subprocess(module: str, *args) -> dict:
    """Run `python -m module args...` and parse the JSON it prints last."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(RESULTS), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(RESULTS)))
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def save(name: str, data) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path
