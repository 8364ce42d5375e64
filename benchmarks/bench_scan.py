"""Selective scan alone on CPU (batch 2, D 128, N 16, float32): seqc's
``selective_scan`` (numba engine and pure-torch fallback) versus mambapy's
``pscan`` (same semantics, built as mambapy's ``selective_scan`` builds it)
and a plain sequential loop under autograd.  Reports median forward and
forward+backward time and the peak memory of one forward+backward, measured
in a fresh subprocess per configuration.

    python -m benchmarks.bench_scan [--lengths 1024,4096] [--repeat 9] [--no-loop]
Writes benchmarks/results/scan.json.  Timings on a shared machine are noisy:
compare medians from one run.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os

import torch
import torch.nn.functional as F

from benchmarks.common import add_output_options, in_subprocess, median_ms, save, set_output

BATCH, D, N = 2, 128, 16
METHODS = ("seqc", "seqc-torch", "mambapy-pscan", "loop")


def inputs(length, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    args = dict(u=r(BATCH, length, D), delta=r(BATCH, length, D) - 1,
                A=-torch.exp(r(D, N) * 0.5), B=r(BATCH, length, N), C=r(BATCH, length, N), D=r(D))
    return {k: v.requires_grad_() for k, v in args.items()}


def seqc_scan(u, delta, A, B, C, D):
    from seqc.backends.torch.scan import selective_scan
    return selective_scan(u, delta, A, B, C, D)


def pscan_scan(u, delta, A, B, C, D):
    from mambapy.pscan import pscan
    delta = F.softplus(delta)
    deltaA = torch.exp(delta.unsqueeze(-1) * A)
    BX = delta.unsqueeze(-1) * B.unsqueeze(2) * u.unsqueeze(-1)
    hs = pscan(deltaA, BX)
    return (hs @ C.unsqueeze(-1)).squeeze(3) + D * u


def loop_scan(u, delta, A, B, C, D):
    delta = F.softplus(delta)
    x, ys = u.new_zeros(u.shape[0], u.shape[2], A.shape[1]), []
    for t in range(u.shape[1]):
        x = torch.exp(delta[:, t, :, None] * A) * x + (delta[:, t] * u[:, t])[..., None] * B[:, t, None]
        ys.append((x * C[:, t, None]).sum(-1))
    return torch.stack(ys, 1) + D * u


def method(name):
    """The scan function of a method; selects the seqc engine through SEQC_NO_NUMBA."""
    if name.startswith("seqc"):
        os.environ["SEQC_NO_NUMBA"] = "1" if name == "seqc-torch" else "0"
        return seqc_scan
    return {"mambapy-pscan": pscan_scan, "loop": loop_scan}[name]


def fwd_bwd(fn, args):
    def go():
        for v in args.values():
            v.grad = None
        fn(**args).sum().backward()
    return go


def _status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def memory_probe(name: str, length: int) -> dict:
    """Peak RSS growth of one forward+backward, after a warm-up run (JIT
    compile), returning free heap pages and resetting the high-water mark."""
    fn, args = method(name), inputs(length)
    step = fwd_bwd(fn, args)
    step()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back to the OS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_kb("VmRSS:")
    step()
    return {"peak_mb": (_status_kb("VmHWM:") - base) / 1024}


def measure(name, length, repeat):
    fn, args = method(name), inputs(length)
    rep = max(2, repeat // 3) if name == "loop" else repeat

    def fwd():
        fn(**args)

    row = {"method": name, "L": length, "fwd_ms": median_ms(fwd, rep),
           "fwd_bwd_ms": median_ms(fwd_bwd(fn, args), rep)}
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors leave RSS at once
    row.update(in_subprocess("benchmarks.bench_scan", "--probe", name, length))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--no-loop", action="store_true", help="skip the slow plain loop")
    ap.add_argument("--probe", nargs=2, metavar=("METHOD", "L"), help=argparse.SUPPRESS)
    add_output_options(ap)
    a = ap.parse_args(argv)
    set_output(a)
    if a.probe:
        print(json.dumps(memory_probe(a.probe[0], int(a.probe[1]))))
        return
    torch.manual_seed(0)
    names = [m for m in METHODS if not (a.no_loop and m == "loop")]
    rows = [measure(m, int(L), a.repeat) for L in a.lengths.split(",") for m in names]
    print(f"selective scan, batch {BATCH}, D {D}, N {N}, float32, {torch.get_num_threads()} threads")
    print(f"{'method':<15}{'L':>6}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak MB':>10}")
    for r in rows:
        print(f"{r['method']:<15}{r['L']:>6}{r['fwd_ms']:>10.2f}{r['fwd_bwd_ms']:>12.2f}"
              f"{r['peak_mb']:>10.1f}")
    path = save("scan.json", {"config": {"batch": BATCH, "D": D, "N": N, "dtype": "float32",
                                         "threads": torch.get_num_threads(), "repeat": a.repeat},
                              "rows": rows})
    print("wrote", path)


if __name__ == "__main__":
    main()
