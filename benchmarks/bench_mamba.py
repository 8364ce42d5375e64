"""Mamba stack (d_model 64, 2 layers, d_state 16, batch 2, float32) on CPU:
seqc's compiled torch module versus mambapy (the pure-PyTorch Mamba), same
weights, measured in one run: forward+backward time, peak activation memory,
token-by-token decoding time per token (the two alternately, 15 rounds of 64 tokens, minimum).

    python -m benchmarks.bench_mamba [--lengths 1024,4096] [--repeat 5]
Writes benchmarks/results/mamba.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from benchmarks.common import add_output_options, in_subprocess, median_ms, peak_mb, rss_mb, save, set_output

D_MODEL, N_LAYERS, D_STATE, BATCH = 64, 2, 16, 2


def models():
    from mambapy.mamba import Mamba, MambaConfig

    import seqc
    torch.manual_seed(0)
    ref = Mamba(MambaConfig(d_model=D_MODEL, n_layers=N_LAYERS, d_state=D_STATE, expand_factor=2, d_conv=4))
    ours = seqc.interop.from_mamba_ssm(ref.state_dict())
    return {"seqc": ours, "mambapy": ref}


def fwd_bwd(model, x):
    def go():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    return go


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_probe(which: str, length: int) -> dict:
    """Activation memory of one forward+backward, in a fresh process: a warm-up call at a
    short length first (kernel compilation, JIT, one-time buffers), then the peak RSS of the
    measured call above the RSS before it.  The peak mark is reset after the warm-up, so the
    compiler's own memory does not count (ru_maxrss could not be reset and reported it)."""
    torch.manual_seed(0)
    m = models()[which]
    fwd_bwd(m, torch.randn(BATCH, 64, D_MODEL))()
    x = torch.randn(BATCH, length, D_MODEL)
    base = rss_mb()
    if _reset_peak():
        fwd_bwd(m, x)()
        return {"peak_extra_mb": max(_hwm_mb() - base, 0.0)}
    before = peak_mb()                                # no clear_refs: best effort
    fwd_bwd(m, x)()
    return {"peak_extra_mb": max(peak_mb(), before) - base}


def _decoder(name, model, steps):
    """A function decoding `steps` tokens token by token from a fresh state."""
    x = torch.randn(BATCH, steps, D_MODEL)
    if name == "seqc":
        def go():
            state = model.init_state(BATCH)
            for t in range(steps):
                _, state = model.step(x[:, t], state)
    else:
        d_inner = 2 * D_MODEL

        def go():
            caches = [(torch.zeros(BATCH, d_inner, D_STATE), torch.zeros(BATCH, d_inner, 3)) for _ in range(N_LAYERS)]
            for t in range(steps):
                _, caches = model.step(x[:, t], caches)
    return go


def decode_ms_per_token(models, steps=64, rounds=15) -> dict:
    """ms per token of token-by-token decoding: the models' decoders run alternately for
    `rounds` rounds (drift and warm caches hit both alike), the minimum per model."""
    goes = {name: _decoder(name, m, steps) for name, m in models.items()}
    best = {name: float("inf") for name in goes}
    with torch.no_grad():
        for go in goes.values():
            go()
        for _ in range(rounds):
            for name, go in goes.items():
                t0 = time.perf_counter()
                go()
                best[name] = min(best[name], (time.perf_counter() - t0) * 1e3 / steps)
    return best


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        print(json.dumps(memory_probe(sys.argv[2], int(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--repeat", type=int, default=5)
    add_output_options(ap)
    args = ap.parse_args()
    set_output(args)
    torch.manual_seed(0)
    ms = models()
    rows = []
    for L in [int(v) for v in args.lengths.split(",")]:
        x = torch.randn(BATCH, L, D_MODEL)
        row = {"length": L}
        for name, m in ms.items():
            row[f"{name}_fwd_bwd_ms"] = median_ms(fwd_bwd(m, x), repeat=args.repeat)
            row[f"{name}_peak_extra_mb"] = in_subprocess("benchmarks.bench_mamba", "--probe", name, L)["peak_extra_mb"]
        row["speedup"] = row["mambapy_fwd_bwd_ms"] / row["seqc_fwd_bwd_ms"]
        row["memory_ratio"] = row["seqc_peak_extra_mb"] / max(row["mambapy_peak_extra_mb"], 1e-9)
        rows.append(row)
        print(f"L={L:5d}  fwd+bwd seqc {row['seqc_fwd_bwd_ms']:8.1f} ms  mambapy {row['mambapy_fwd_bwd_ms']:8.1f} ms  "
              f"speedup {row['speedup']:.2f}x   peak extra memory seqc {row['seqc_peak_extra_mb']:.0f} MB  "
              f"mambapy {row['mambapy_peak_extra_mb']:.0f} MB  (ratio {row['memory_ratio']:.2f})", flush=True)
    decode = decode_ms_per_token(ms)
    print(f"decode per token: seqc {decode['seqc']:.3f} ms  mambapy {decode['mambapy']:.3f} ms  "
          f"(seqc/mambapy {decode['seqc'] / decode['mambapy']:.2f})")
    print("wrote", save("mamba.json", {"config": dict(d_model=D_MODEL, n_layers=N_LAYERS, d_state=D_STATE,
                                                       batch=BATCH, dtype="float32"),
                                        "torch_threads": torch.get_num_threads(), "rows": rows,
                                        "decode_ms_per_token": decode}))


if __name__ == "__main__":
    main()
