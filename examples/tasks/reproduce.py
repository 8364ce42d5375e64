"""Train every model of a comparison on one task and write the table and the joint plot.

    python examples/tasks/reproduce.py --task selective-copying [--profile quick|medium|default] [--models mamba,s4d,...]
        [--out benchmarks/results/tasks] [--threads 1] [any `seqc train` hyper-parameter as --name=value]

Each model is trained with ``seqc.train.train`` (resumable: re-running continues
every unfinished run from its checkpoint), then ``OUT/TASK[-PROFILE]/summary.json``,
``summary.md`` (the table) and ``curves.png`` (all models) are written from the
runs' metrics files, so an interrupted comparison can be finished or redrawn.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))     # run from a checkout without installing

from seqc.train import TrainConfig, load_records, plot_curves, train  # noqa: E402

MODELS = {"selective_copying": ["mamba", "mamba2", "s4d", "h3", "lstm", "transformer"],
          "induction_heads": ["mamba", "transformer", "mamba2", "s4d", "h3", "lstm"]}
NAMES = {"mamba": "Mamba (selective, S6)", "mamba2": "Mamba-2 (selective, SSD)", "s4d": "S4D (time-invariant, no gate)",
         "h3": "H3 (time-invariant + gating)", "lstm": "LSTM", "transformer": "Transformer (attention, NoPE)"}
PAPER = {"selective_copying": {"s4d": "18.3 (S4, no gate)", "h3": "57.0 (H3)", "mamba": "99.8 (S6 / Mamba)",
                               "mamba2": "-", "lstm": "-", "transformer": "-"}}


def summarise(task, runs, out, meta):
    rows = []
    for name, records in runs.items():
        cfg_path = os.path.join(out, name, "config.json")
        cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
        evals = [r for r in records if "event" not in r]
        fin = next((r for r in records if r.get("event") == "final"), None)
        ext = next((r for r in records if r.get("event") == "extrapolation"), None)
        last = evals[-1] if evals else {}
        rows.append({"model": name, "n_params": cfg.get("n_params"), "steps_done": last.get("step"),
                     "steps": cfg.get("steps"), "finished": fin is not None, "eval_acc": last.get("eval_acc"),
                     "best_eval_acc": max((r["eval_acc"] for r in evals), default=None),
                     "eval_loss": last.get("eval_loss"), "wall_s": last.get("wall_s"),
                     "extrapolation": ext["acc"] if ext else None})
    summary = {"task": task, **meta, "rows": rows}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = ["| model | params | steps | eval token accuracy (%) | paper (%) | train wall time |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        acc = "-" if r["eval_acc"] is None else f"{100 * r['eval_acc']:.1f}"
        steps = f"{r['steps_done']}/{r['steps']}" if r["steps_done"] is not None else "-"
        wall = "-" if r["wall_s"] is None else f"{r['wall_s'] / 60:.1f} min"
        lines.append(f"| {NAMES.get(r['model'], r['model'])} | {r['n_params']} | {steps} | {acc} | "
                     f"{PAPER.get(task, {}).get(r['model'], '-')} | {wall} |")
    ext_rows = [r for r in rows if r["extrapolation"]]
    if ext_rows:
        lengths = sorted({k for r in ext_rows for k in r["extrapolation"]}, key=int)
        lines += ["", "| model | " + " | ".join(f"L={k}" for k in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for r in ext_rows:
            lines.append(f"| {NAMES.get(r['model'], r['model'])} | " +
                         " | ".join(f"{100 * r['extrapolation'][k]:.1f}" if k in r["extrapolation"] else "-" for k in lengths) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True)
    p.add_argument("--profile", default="default", help="quick | medium | default")
    p.add_argument("--models", default=None)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "tasks"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-after", type=int, default=None, help="steps per model in this invocation")
    p.add_argument("--summarise-only", action="store_true", help="redraw table and plot from the metrics")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a training setting (e.g. --set steps=800)")
    args = p.parse_args(argv)
    task = args.task.replace("-", "_")
    overrides = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        overrides[k] = tuple(int(x) for x in v.split(",")) if k == "extrapolate" else (
            float(v) if any(c in v for c in ".e") else int(v))
    cfg = TrainConfig.profile(task, args.profile, seed=args.seed, **overrides)
    models = args.models.split(",") if args.models else MODELS[task]
    out = os.path.join(args.out, task + ("" if args.profile == "default" else "-" + args.profile))
    os.makedirs(out, exist_ok=True)
    runs = {}
    for name in models:
        run_dir = os.path.join(out, name)
        if not args.summarise_only:
            train(os.path.join(HERE, f"{name}.seq"), cfg, run_dir, resume=True, threads=args.threads,
                  label=name, stop_after=args.stop_after)
        runs[name] = load_records(run_dir)
    meta = {"config": cfg.to_json(), "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs", "command": "python examples/tasks/reproduce.py " + " ".join(
                argv if argv is not None else sys.argv[1:])}
    print(summarise(task, runs, out, meta))
    t = cfg.make_task()
    plot_curves(runs, os.path.join(out, "curves.png"), title=f"{task} (L={cfg.length})", chance=t.chance_loss)


if __name__ == "__main__":
    main()
