"""Benchmark helpers: median timing, peak-memory measurement in a fresh
subprocess, and JSON output.

Results go to a temporary directory by default; only ``--save`` writes into
``benchmarks/results/`` (the committed results the README quotes), and ``--out
DIR`` picks another directory (``add_output_options`` / ``set_output``)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from seqc.benchmark import median_ms  # noqa: F401  (one timer for `seqc bench` and these scripts)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_OUT = [None]          # the directory set_output chose; None: a temporary directory


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


def add_output_options(ap) -> None:
    """--save (write into benchmarks/results/, overwriting the committed results) and --out DIR."""
    ap.add_argument("--save", action="store_true",
                    help="write the results into benchmarks/results/ (replaces the committed ones)")
    ap.add_argument("--out", metavar="DIR", default=None,
                    help="directory for the results (default: a temporary directory)")


def set_output(args) -> str:
    """Choose the results directory from parsed --save / --out; returns it."""
    if args.save and args.out:
        raise SystemExit("give --save or --out, not both")
    _OUT[0] = RESULTS if args.save else args.out
    return output_dir()


def output_dir() -> str:
    """Where results are written: benchmarks/results/ only after --save."""
    path = _OUT[0] or os.path.join(tempfile.gettempdir(), "seqc-benchmarks")
    os.makedirs(path, exist_ok=True)
    return path


def save(name: str, data) -> str:
    path = os.path.join(output_dir(), name)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path
