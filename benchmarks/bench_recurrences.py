"""Time the plans of the gated linear recurrences: rglru (recursive-doubling scan vs the
loop) and gla (chunked vs the loop, for each decay), forward and forward+backward.

    python -m benchmarks.bench_recurrences [--lengths 256,1024] [--batch 2] [--width 256] [--device cpu]
"""
from __future__ import annotations

import argparse

import torch

from seqc.backends.torch.base import LAYERS
from seqc.benchmark import median_ms


def _layer(op, attrs, width, device, std):
    layer = LAYERS[op]([width], attrs).to(device)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, std)
    return layer


def _time(layer, x, plan, train):
    layer.plan = plan

    def run():
        xx = x.detach().requires_grad_(train)
        y = layer(xx)
        if train:
            y.sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
    return median_ms(run, repeat=3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", default="256,1024")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    cases = [("rglru", {"heads": 4}, 0.1)] + [("gla", {"heads": 4, "key_dim": a.width // 2, "decay": d}, 0.05)
                                                for d in ("gated", "fixed", "none")]
    for length in (int(v) for v in a.lengths.split(",")):
        x = torch.randn(a.batch, length, a.width, device=a.device)
        for op, attrs, std in cases:
            layer = _layer(op, attrs, a.width, a.device, std)
            for train in (False, True):
                scan, loop = _time(layer, x, "scan", train), _time(layer, x, "recurrent", train)
                print(f"{op:5s} {attrs.get('decay', ''):6s} B={a.batch} L={length:5d} D={a.width} "
                      f"{'fwd+bwd' if train else 'fwd    '}  scan {scan:8.1f} ms   recurrent {loop:8.1f} ms")


if __name__ == "__main__":
    main()
