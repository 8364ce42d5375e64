"""Fused selective scan (seqc's generated Triton kernels) against the torch backend's scan.

On a GPU (default sizes): batch 8, d_inner 2048, d_state 16, lengths 1K-16K,
float32 and bfloat16, forward and forward+backward.  Reported per case: time,
the forward's achieved bandwidth (bytes of u, delta, z, B, C read and y
written) against the device's copy bandwidth measured in the same run, and
the speedup over the torch backend's ``selective_scan`` on the same device.
Also: the within-chunk variants (``tl.associative_scan`` vs a sequential
loop) and the chunk-parallel forward, a Mamba stack forward+backward and
per-token decoding against mambapy.

    python benchmarks/gpu_scan.py [--lengths 1024,4096,16384] [--dtypes float32,bfloat16]
    TRITON_INTERPRET=1 python benchmarks/gpu_scan.py --tiny     # CPU interpreter, tiny sizes (CI)

On the interpreter the times measure Python-level interpretation, not a GPU:
only the relative cost of the two within-chunk variants means anything there.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import seqc  # noqa: E402,F401
from seqc.backends.torch import scan as torch_scan  # noqa: E402
from seqc.backends.triton import kernels, layers  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


WARMUP = [1]    # calls before timing (0 on the interpreter, where nothing warms up)


def time_ms(fn, device, repeat=5, warmup=None):
    warmup = WARMUP[0] if warmup is None else warmup
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, nbytes):
    """GB/s of a device-to-device copy of nbytes (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeat=10)
    return 2 * src.numel() * 4 / ms / 1e6


def scan_args(batch, length, d, n, dtype, device, grad=False):
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)  # noqa: E731
    A = (-torch.rand(d, n, generator=g) - 0.5).to(device).requires_grad_(grad)
    D = torch.randn(d, generator=g).to(device).requires_grad_(grad)
    bias = torch.randn(d, generator=g).to(device).requires_grad_(grad)
    return dict(u=r(batch, length, d), delta=r(batch, length, d), A=A, B=r(batch, length, n),
                C=r(batch, length, n), D=D, z=r(batch, length, d), delta_bias=bias)


def scan_bench(args, device, lengths, dtypes, repeat):
    b, d, n = args.batch, args.d_inner, args.d_state
    elem_max = max(torch.tensor([], dtype=DTYPES[t]).element_size() for t in dtypes)
    copy_gbs = copy_bandwidth(device, max(4 * b * max(lengths) * d * elem_max, 1 << 20))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {name}; copy bandwidth {copy_gbs:.1f} GB/s")
    print(f"selective scan, batch {b}, d_inner {d}, d_state {n}")
    print(f"{'dtype':>9} {'L':>6} {'fwd ms':>9} {'GB/s':>8} {'%copy':>6} {'torch fwd':>10} {'x':>6} "
          f"{'fwd+bwd ms':>11} {'torch f+b':>10} {'x':>6}")
    for tname in dtypes:
        dtype = DTYPES[tname]
        for length in lengths:
            a = scan_args(b, length, d, n, dtype, device)
            with torch.no_grad():
                fused = time_ms(lambda: kernels.selective_scan(**a), device, repeat)
                ref = time_ms(lambda: torch_scan.selective_scan(**a), device, repeat)
                y_f = kernels.selective_scan(**a)[0].double()
                y_r = torch_scan.selective_scan(**a).double()
                rel = float((y_f - y_r).abs().max() / y_r.abs().max().clamp(min=1e-30))
            elem = a["u"].element_size()
            nbytes = (4 * b * length * d + 2 * b * length * n) * elem
            gbs = nbytes / fused / 1e6
            ag = scan_args(b, length, d, n, dtype, device, grad=True)
            leaves = list(ag.values())

            def fb_fused():
                y, _ = kernels.selective_scan(**ag)
                torch.autograd.grad(y.float().sum(), leaves)

            def fb_torch():
                y = torch_scan.selective_scan(**ag)
                torch.autograd.grad(y.float().sum(), leaves)
            fb = time_ms(fb_fused, device, repeat)
            fb_ref = time_ms(fb_torch, device, repeat)
            print(f"{tname:>9} {length:>6} {fused:>9.3f} {gbs:>8.1f} {100 * gbs / copy_gbs:>5.0f}% {ref:>10.3f} "
                  f"{ref / fused:>5.1f}x {fb:>11.3f} {fb_ref:>10.3f} {fb_ref / fb:>5.1f}x   "
                  f"max |triton - torch| / max |torch| {rel:.1e}")


def chunk_variants(args, device, length, repeat):
    """tl.associative_scan within a chunk against the sequential in-register loop (forward)."""
    a = scan_args(args.batch, length, args.d_inner, args.d_state, torch.float32, device)
    with torch.no_grad():
        assoc = time_ms(lambda: kernels.selective_scan(**a, assoc=True, split=False), device, repeat)
        loop = time_ms(lambda: kernels.selective_scan(**a, assoc=False, split=False), device, repeat)
        split = time_ms(lambda: kernels.selective_scan(**a, split=True), device, repeat)
    print(f"within-chunk scan at L={length}: associative_scan {assoc:.3f} ms, sequential loop {loop:.3f} ms "
          f"(loop / assoc = {loop / assoc:.2f}); chunk-parallel (split) forward {split:.3f} ms")


def mamba_bench(args, device, length, repeat):
    """A Mamba stack (seqc Triton layers vs mambapy, same weights): fwd+bwd and per-token decoding."""
    from mambapy.mamba import Mamba, MambaConfig

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=args.d_model, n_layers=args.n_layers, d_state=args.d_state, expand_factor=2, d_conv=4)
    ref = Mamba(cfg).to(device)
    ours = seqc.interop.from_mamba_ssm(ref.state_dict()).to(device)
    swapped = sum(layers.swap(m) for m in ours.modules())
    x = torch.randn(args.batch, length, args.d_model, device=device)
    with torch.no_grad():
        diff = float((ours(x) - ref(x)).abs().max())

    def fb(model):
        def go():
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()
        return go
    t_ours, t_ref = time_ms(fb(ours), device, repeat), time_ms(fb(ref), device, repeat)
    print(f"mamba stack d_model {args.d_model} x {args.n_layers} layers, L={length} ({swapped} layers on Triton): "
          f"fwd+bwd seqc-triton {t_ours:.2f} ms, mambapy {t_ref:.2f} ms ({t_ref / t_ours:.2f}x); "
          f"max |triton - mambapy| {diff:.1e}")
    steps = args.decode_steps
    d_inner = 2 * args.d_model

    def dec_ours():
        state = ours.init_state(args.batch)
        for t in range(steps):
            _, state = ours.step(x[:, t % length], state)

    def dec_ref():
        caches = [(torch.zeros(args.batch, d_inner, args.d_state, device=device),
                   torch.zeros(args.batch, d_inner, 3, device=device)) for _ in range(args.n_layers)]
        for t in range(steps):
            _, caches = ref.step(x[:, t % length], caches)
    with torch.no_grad():
        d_ours = time_ms(dec_ours, device, max(1, repeat // 2)) / steps
        d_ref = time_ms(dec_ref, device, max(1, repeat // 2)) / steps
    print(f"decoding: seqc-triton {d_ours:.3f} ms/token, mambapy {d_ref:.3f} ms/token ({d_ref / d_ours:.2f}x)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes for the CPU interpreter (CI)")
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--d-inner", type=int, default=2048)
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    if args.tiny:
        args.batch, args.d_inner, args.d_state, args.d_model, args.n_layers = 2, 8, 4, 4, 1
        args.decode_steps, args.repeat, args.lengths, args.dtypes = 2, 1, "16", "float32,bfloat16"
        WARMUP[0] = 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = kernels.available()
    if reason is not None:
        raise SystemExit(f"gpu_scan: {reason}")
    lengths = [int(v) for v in args.lengths.split(",")]
    dtypes = args.dtypes.split(",")
    scan_bench(args, device, lengths, dtypes, args.repeat)
    chunk_variants(args, device, min(4096, max(lengths)), args.repeat)
    mamba_bench(args, device, 16 if args.tiny else 2048, args.repeat)


if __name__ == "__main__":
    main()
