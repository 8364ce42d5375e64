"""Mamba-2 language model on CPU, float32: seqc's compiled torch module versus
transformers' Mamba2ForCausalLM (its pure-PyTorch path: the chunked
``torch_forward`` scan for sequences, ``selective_state_update`` per token),
same weights, all ratios measured in one run:

* forward+backward at L = 2048 (seqc with the plan its planner picks);
* seqc's chunked SSD plan versus its recurrence plan, forward+backward, L = 4096;
* token-by-token decoding, time per token;
* what the planner picks for the SSD layer at lengths 1..1024 (training and
  inference) against the measured faster plan.

    python -m benchmarks.bench_mamba2 [--repeat 5] [--chunk 64] [--save | --out DIR]
Writes mamba2.json (into benchmarks/results/ with --save).
"""
from __future__ import annotations

import argparse
import warnings

import torch

from benchmarks.common import add_output_options, compare_ms, median_ms, save, set_output

CONFIG = dict(hidden_size=128, num_heads=8, head_dim=32, expand=2, state_size=64, n_groups=1, num_hidden_layers=2,
              vocab_size=256, conv_kernel=4)
BATCH = 2


def models(chunk: int):
    import transformers
    from transformers import Mamba2Config, Mamba2ForCausalLM

    import seqc
    from seqc.interop.families import mamba2 as family
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    cfg = Mamba2Config(**CONFIG, chunk_size=chunk)
    torch.manual_seed(0)
    ref = Mamba2ForCausalLM(cfg).float()
    config = cfg.to_dict()
    src = family.spec_for_config(config)
    sd = family.convert_state_dict(ref.state_dict(), config)
    ours = {}
    for mode in ("auto", "scan", "recurrent"):
        ours[mode] = seqc.compile(src, backend="torch", mode=mode)
        ours[mode].load_state_dict(sd, strict=True)
    return ref, ours, cfg


def fwd_bwd(model, tokens, hf=False):
    def go():
        model.zero_grad(set_to_none=True)
        out = model(tokens, use_cache=False).logits if hf else model(tokens)
        out.float().pow(2).mean().backward()
    return go


def decode_ms_per_token(ref, ours, cfg, steps=64):
    from transformers import DynamicCache
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, steps))

    def hf():
        cache = DynamicCache(config=cfg)
        ref(tokens[:, :1], cache=cache, use_cache=True)
        for t in range(1, steps):
            ref(tokens[:, t:t + 1], cache=cache, use_cache=True)

    def sq():
        state = ours.init_state(BATCH)
        for t in range(steps):
            _, state = ours.step(tokens[:, t], state)

    with torch.no_grad():
        t_sq, t_hf = compare_ms(sq, hf, repeat=5)
    return t_sq / steps, t_hf / steps


def planner_picks(ours, lengths, training):
    """The plan seqc's cost model picks for the SSD layers at each length."""
    node = next(n for n in ours.graph.order() if n.op == "ssd")
    from seqc.passes.manager import PlanContext
    from seqc.passes.planner import plan_for_shapes
    return {L: plan_for_shapes(node, PlanContext(length=None, backend="torch"), BATCH, L, training) for L in lengths}


def measured_winners(lengths, repeat):
    """The faster plan of the SSD layer alone (the benchmark's dimensions), by measurement."""
    from seqc.backends.torch.base import LAYERS
    H, P, G, N = CONFIG["num_heads"], CONFIG["head_dim"], CONFIG["n_groups"], CONFIG["state_size"]
    out = {"training": {}, "inference": {}}
    for L in lengths:
        ins = [torch.randn(BATCH, L, H * P), torch.randn(BATCH, L, H), torch.randn(BATCH, L, G * N),
               torch.randn(BATCH, L, G * N)]
        layers = {}
        for plan in ("scan", "recurrent"):
            layer = LAYERS["ssd"]([H * P, H, G * N, G * N], dict(head_dim=P, d_state=N, n_groups=G, chunk=64,
                                                                  plan=plan))
            with torch.no_grad():
                layer.A_log.copy_(torch.log(torch.arange(1.0, H + 1)))
            layers[plan] = layer

        def train(layer):
            return lambda: layer(*ins).sum().backward()

        def infer(layer):
            def go():
                with torch.no_grad():
                    layer(*ins)
            return go
        for kind, make in (("training", train), ("inference", infer)):
            t_scan, t_rec = compare_ms(make(layers["scan"]), make(layers["recurrent"]),
                                       repeat=repeat if L <= 256 else 1)
            out[kind][L] = {"scan_ms": t_scan, "recurrent_ms": t_rec,
                            "winner": "scan" if t_scan < t_rec else "recurrent"}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=64, help="chunk_size of the config (both implementations)")
    ap.add_argument("--train-length", type=int, default=2048)
    ap.add_argument("--plan-length", type=int, default=4096)
    add_output_options(ap)
    args = ap.parse_args()
    set_output(args)
    ref, ours, cfg = models(args.chunk)
    out = {"config": {**CONFIG, "chunk_size": args.chunk, "batch": BATCH, "dtype": "float32"},
           "torch_threads": torch.get_num_threads()}

    L = args.train_length
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, L))
    t_sq, t_hf = compare_ms(fwd_bwd(ours["auto"], tokens), fwd_bwd(ref, tokens, hf=True), repeat=args.repeat)
    out["fwd_bwd"] = {"length": L, "seqc_ms": t_sq, "transformers_ms": t_hf, "speedup": t_hf / t_sq}
    print(f"fwd+bwd L={L}: seqc {t_sq:.1f} ms  transformers {t_hf:.1f} ms  speedup {t_hf / t_sq:.2f}x", flush=True)

    L = args.plan_length
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, L))
    t_scan = median_ms(fwd_bwd(ours["scan"], tokens), repeat=args.repeat)
    t_rec = median_ms(fwd_bwd(ours["recurrent"], tokens), repeat=1)
    out["plans"] = {"length": L, "scan_ms": t_scan, "recurrent_ms": t_rec, "ratio": t_rec / t_scan}
    print(f"fwd+bwd L={L}: chunked SSD plan {t_scan:.1f} ms  recurrence plan {t_rec:.1f} ms  "
          f"chunked {t_rec / t_scan:.1f}x faster", flush=True)

    d_sq, d_hf = decode_ms_per_token(ref, ours["auto"], cfg)
    out["decode_ms_per_token"] = {"seqc": d_sq, "transformers": d_hf, "ratio": d_sq / d_hf}
    print(f"decode per token: seqc {d_sq:.3f} ms  transformers {d_hf:.3f} ms  (seqc/transformers {d_sq / d_hf:.2f})")

    lengths = (1, 4, 16, 64, 256, 1024)
    picks = {"training": planner_picks(ours["auto"], lengths, True),
             "inference": planner_picks(ours["auto"], lengths, False)}
    measured = measured_winners(lengths, args.repeat)
    out["planner"] = {kind: {L: {"picked": picks[kind][L], **measured[kind][L]} for L in lengths}
                      for kind in picks}
    for kind in picks:
        right = sum(picks[kind][L] == measured[kind][L]["winner"] for L in lengths)
        print(f"planner ({kind}): right at {right} of {len(lengths)} lengths; "
              + ", ".join(f"L={L} {picks[kind][L]}"
                          + ("" if picks[kind][L] == measured[kind][L]["winner"] else
                             f" (measured {measured[kind][L]['winner']}: scan {measured[kind][L]['scan_ms']:.2f} ms,"
                             f" recurrent {measured[kind][L]['recurrent_ms']:.2f} ms)")
                          for L in lengths))
    print("wrote", save("mamba2.json", out))


if __name__ == "__main__":
    main()
