"""Per-layer CPU benchmarks against the peers a user would otherwise call,
measured in one run (float32, 2 threads):

* LSTM vs torch.nn.LSTM (forward+backward), attention vs
  F.scaled_dot_product_attention with the same projections (forward+backward),
* S4D: the convolution plan vs the scan plan at length 8192 (forward), and
  which plan the planner picks there,
* a scaling sweep, time vs length for each layer kind, plotted log-log to
  benchmarks/results/scaling.png.

    python -m benchmarks.bench_layers [--quick]
Writes benchmarks/results/layers.json.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import seqc
from benchmarks.common import add_output_options, compare_ms, median_ms, output_dir, save, set_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ex(name):
    return os.path.join(ROOT, "examples", name)


def lstm_vs_torch(L, repeat):
    ours = seqc.compile(ex("lstm.seq"), params={"d_model": 64, "hidden": 128, "layers": 1})
    ref = torch.nn.LSTM(64, 128, batch_first=True)
    ours.get_submodule("lstm").load_state_dict(ref.state_dict())
    x = torch.randn(4, L, 64)
    t_ours, t_ref = compare_ms(lambda: ours(x).sum().backward(), lambda: ref(x)[0].sum().backward(), repeat)
    return {"length": L, "seqc_ms": t_ours, "torch_lstm_ms": t_ref, "ratio": t_ours / t_ref}


def attention_vs_sdpa(L, repeat):
    d, h = 128, 4
    ours = seqc.compile(ex("attention.seq"), params={"d_model": d, "n_heads": h})
    attn = ours.get_submodule("attn")
    x = torch.randn(4, L, d)

    def sdpa():
        b = x.shape[0]
        q, k, v = (proj(x).view(b, L, h, d // h).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, L, d)
        return attn.o_proj(y)
    t_ours, t_ref = compare_ms(lambda: ours(x).sum().backward(), lambda: sdpa().sum().backward(), repeat)
    return {"length": L, "seqc_ms": t_ours, "sdpa_ms": t_ref, "ratio": t_ours / t_ref}


def s4d_plans(L, repeat):
    params = {"d_model": 64, "d_state": 64}
    x = torch.randn(1, L, 64)
    out = {"length": L}
    for mode in ("conv", "scan"):
        m = seqc.compile(ex("s4d.seq"), params=params, mode=mode)
        with torch.no_grad():
            out[f"{mode}_ms"] = median_ms(lambda: m(x), repeat)
    auto = seqc.compile(ex("s4d.seq"), params=params, length=L, batch=1)
    out["planner_picks"] = auto.get_submodule("ssm").plan
    out["conv_speedup"] = out["scan_ms"] / out["conv_ms"]
    return out


def scaling(lengths, repeat):
    kinds = {
        "s4d (conv)": (ex("s4d.seq"), {"d_model": 64, "d_state": 64}, "conv"),
        "s4d (scan)": (ex("s4d.seq"), {"d_model": 64, "d_state": 64}, "scan"),
        "mamba": (ex("mamba.seq"), {"n_layers": 1}, "auto"),
        "lstm": (ex("lstm.seq"), {"d_model": 64, "hidden": 64}, "auto"),
        "attention": (ex("attention.seq"), {"d_model": 64, "n_heads": 4}, "auto"),
    }
    table = {}
    for name, (spec, params, mode) in kinds.items():
        m = seqc.compile(spec, params=params, mode=mode)
        table[name] = {}
        for L in lengths:
            x = torch.randn(1, L, 64)
            with torch.no_grad():
                table[name][L] = median_ms(lambda: m(x), repeat)
        print(f"  {name:<12} " + " ".join(f"{table[name][L]:9.2f}" for L in lengths), flush=True)
    return table


def plot(table, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, row in table.items():
        ls = sorted(row)
        ax.loglog(ls, [row[L] for L in ls], marker="o", label=name)
    ls = sorted(next(iter(table.values())))
    ref = table["attention"][ls[0]]
    ax.loglog(ls, [ref * (L / ls[0]) ** 2 for L in ls], "k:", lw=1, label="~ L^2")
    ref = table["s4d (conv)"][ls[0]]
    ax.loglog(ls, [ref * (L / ls[0]) for L in ls], "k--", lw=1, label="~ L")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("forward time (ms), batch 1, 64 channels")
    ax.set_title("seqc torch backend on CPU: time vs length")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer lengths and repeats")
    add_output_options(ap)
    args = ap.parse_args()
    set_output(args)
    torch.manual_seed(0)
    repeat = 3 if args.quick else 9
    result = {"torch_threads": torch.get_num_threads()}
    result["lstm"] = [lstm_vs_torch(L, repeat) for L in (256, 1024)]
    for r in result["lstm"]:
        print(f"lstm L={r['length']}: seqc {r['seqc_ms']:.1f} ms  nn.LSTM {r['torch_lstm_ms']:.1f} ms  ratio {r['ratio']:.2f}")
    result["attention"] = [attention_vs_sdpa(L, repeat) for L in (256, 1024)]
    for r in result["attention"]:
        print(f"attention L={r['length']}: seqc {r['seqc_ms']:.1f} ms  sdpa {r['sdpa_ms']:.1f} ms  ratio {r['ratio']:.2f}")
    result["s4d"] = s4d_plans(8192, 3)
    r = result["s4d"]
    print(f"s4d L=8192: conv {r['conv_ms']:.1f} ms  scan {r['scan_ms']:.1f} ms  conv speedup {r['conv_speedup']:.1f}x  "
          f"planner picks {r['planner_picks']}")
    lengths = (64, 256, 1024, 4096) if args.quick else (64, 256, 1024, 4096, 8192)
    print("scaling (forward ms) at L =", " ".join(f"{L:9d}" for L in lengths))
    result["scaling"] = scaling(lengths, 2 if args.quick else 3)
    png = os.path.join(output_dir(), "scaling.png")
    plot(result["scaling"], png)
    print("wrote", save("layers.json", result), "and", png)


if __name__ == "__main__":
    main()
