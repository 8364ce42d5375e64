"""Training seqc-compiled models on the synthetic tasks (``seqc train`` and
``seqc.train.train``): a standard PyTorch loop (AdamW, linear warm-up then a
cosine schedule, gradient clipping), seeded and deterministic, with a progress
bar, metrics as JSON lines, checkpoints that a later run resumes exactly, and a
matplotlib plot of the learning curves.

Reproducibility: the weights come from ``seqc.compile(..., seed=seed)``, the
batch of step ``s`` from an RNG seeded by ``(seed, s)`` and the evaluation set
from one seeded by ``seed`` alone, so two runs with the same configuration
write the same metrics, and a run resumed from a checkpoint continues with the
batches, optimiser state and schedule of the uninterrupted one.  A checkpoint is
written at every evaluation (the metrics file is cut back to it on resume).

Output directory: ``config.json``, ``metrics.jsonl`` (one record per
evaluation, then ``extrapolation`` and ``final`` records), ``checkpoint.pt``,
``curves.png``.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from .errors import SeqcError
from .tasks import get_task

# Hyper-parameters per task and profile.  "quick" is the CI learning check (well under two minutes for a
# pair of models on a 2-core CPU); "default" is the reproduction of the paper's comparison.
PROFILES = {
    "selective_copying": {
        "quick": dict(length=64, n_tokens=4, n_data=8, batch=32, steps=250, lr=3e-3, warmup=20,
                      eval_every=50, eval_size=256),
        "small": dict(length=64, n_tokens=4, n_data=8, batch=32, steps=600, lr=5e-3, warmup=20,
                      eval_every=100, eval_size=256),
        "medium": dict(length=128, n_tokens=8, n_data=16, batch=32, steps=1000, lr=4e-3, warmup=50,
                       eval_every=50, eval_size=256),
        # 16 tokens of a 16-token vocabulary among 256 (the paper: 4096, 400k steps).  At lr >= 3e-3 a
        # 2-layer Mamba stays on the chance plateau for 2000+ steps; at 1.5e-3 it leaves it near step 1500
        # (benchmarks/results/tasks/selective_copying-probes/).
        "default": dict(length=256, n_tokens=16, n_data=16, batch=32, steps=8000, lr=1.5e-3, warmup=100,
                        eval_every=200, eval_size=512),
    },
    "induction_heads": {
        "quick": dict(length=32, n_data=8, batch=32, steps=300, lr=3e-3, warmup=20, eval_every=50,
                      eval_size=256, extrapolate=(1, 2, 4)),
        # the quick setting trained 2000 steps: long enough for attention to learn it in-distribution,
        # so the extrapolation of both can be compared
        "small": dict(length=32, n_data=8, batch=32, steps=2000, lr=3e-3, warmup=20, eval_every=100,
                      eval_size=256, extrapolate=(1, 2, 4, 8, 16)),
        "medium": dict(length=64, n_data=16, batch=32, steps=600, lr=3e-3, warmup=50, eval_every=50,
                       eval_size=256, eval_batch=16, extrapolate=(1, 2, 4, 8, 16)),
        # the paper's training length; 8 tokens, not its 16: with 16 (lr 1e-3 to 2e-3) Mamba stayed on the
        # chance plateau for 2500+ steps, with 8 it leaves it near step 1400 and is perfect by 1500
        # (benchmarks/results/tasks/induction_heads-probes/)
        "default": dict(length=256, n_data=8, batch=32, steps=2000, lr=3e-3, warmup=100, eval_every=100,
                        eval_size=512, eval_batch=16, extrapolate=(1, 2, 4, 8, 16)),
    },
}


NO_DECAY = {"A_log", "D", "log_dt", "log_A_real", "A_imag", "A", "B", "C", "dt"}


@dataclass
class TrainConfig:
    """One training run.  Task settings (`n_tokens`, `n_data`) go to the task's generator."""
    task: str = "selective_copying"
    length: int = 512
    batch: int = 32
    steps: int = 2000
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_size: int = 512
    eval_batch: int = 64
    seed: int = 0
    n_tokens: int | None = None
    n_data: int | None = None
    extrapolate: tuple = ()
    params: dict = field(default_factory=dict)    # spec parameter overrides (vocab is set from the task)

    @classmethod
    def profile(cls, task: str, profile: str = "default", **overrides) -> "TrainConfig":
        key = task.replace("-", "_")
        get_task(key)                       # unknown task -> SeqcError
        if profile not in PROFILES[key]:
            raise SeqcError(f"unknown profile {profile!r} for task {key}; expected one of "
                            f"{', '.join(PROFILES[key])}")
        values = dict(PROFILES[key][profile], task=key)
        values.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in fields(cls)}
        bad = sorted(set(values) - names)
        if bad:
            raise SeqcError(f"unknown training setting(s): {', '.join(bad)}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def make_task(self):
        kw = {k: getattr(self, k) for k in ("n_tokens", "n_data") if getattr(self, k) is not None}
        if self.task.replace("-", "_") == "induction_heads":
            kw.pop("n_tokens", None)
        return get_task(self.task, **kw)

    def validate(self):
        for name in ("length", "batch", "steps", "eval_every", "eval_size", "eval_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise SeqcError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("lr",):
            if not getattr(self, name) > 0:
                raise SeqcError(f"--{name} must be positive, got {getattr(self, name)!r}")
        if self.warmup < 0 or self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise SeqcError("--warmup and --weight-decay must be >= 0 and --min-lr-ratio in [0, 1]")
        if any((not isinstance(m, int)) or m < 1 for m in self.extrapolate):
            raise SeqcError(f"--extrapolate takes positive integer multiples of --length, got {self.extrapolate}")
        self.make_task().check_length(self.length)

    def to_json(self) -> dict:
        d = asdict(self)
        d["extrapolate"] = list(self.extrapolate)
        return d


def need_extras():
    """tqdm and matplotlib, or a SeqcError saying how to get them."""
    missing = []
    for mod in ("tqdm", "matplotlib"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise SeqcError(f"seqc train needs {' and '.join(missing)}: pip install 'seqc[train]' "
                        f"(or pip install {' '.join(missing)})")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_lr_ratio` at `steps`."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _batch_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0, step])


def _eval_rng(seed: int, length: int) -> np.random.Generator:
    return np.random.default_rng([seed, 1, length])


def set_threads(n: int) -> int:
    """Use `n` CPU threads in torch; returns the previous count.  The CPU kernels follow
    torch's thread count at each launch.  numba's own setting is left alone: setting it
    before the first kernel launch starts numba's OpenMP pool with a worker per core,
    and with one thread asked for, the idle worker spins on the other core (measured:
    4x the CPU time per training step, and half the speed of two runs side by side)."""
    import torch
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    return prev


def restore_threads(prev: int):
    import torch
    torch.set_num_threads(prev)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def masked_loss(logits, targets, mask):
    import torch.nn.functional as F
    sel = mask.reshape(-1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1])[sel], targets.reshape(-1)[sel])


def evaluate(model, task, cfg: TrainConfig, length: int | None = None) -> dict:
    """Loss and token accuracy on the fixed evaluation set at `length` (default: the training length)."""
    import torch
    length = length or cfg.length
    tokens, targets, mask = task.batch(_eval_rng(cfg.seed, length), cfg.eval_size, length)
    total, correct, count = 0.0, 0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, cfg.eval_size, cfg.eval_batch):
            t, y, m = (torch.from_numpy(a[i:i + cfg.eval_batch]) for a in (tokens, targets, mask))
            logits = model(t)
            n = int(m.sum())
            total += float(masked_loss(logits, y, m)) * n
            correct += int((logits.argmax(-1)[m] == y[m]).sum())
            count += n
    model.train(was_training)
    return {"eval_loss": total / count, "eval_acc": correct / count}


@dataclass
class TrainResult:
    spec: str
    out_dir: str
    config: TrainConfig
    n_params: int
    records: list
    model: object = None

    @property
    def final(self) -> dict:
        return next((r for r in reversed(self.records) if r.get("event") == "final"), {})


EVAL_ONLY = ("extrapolate", "eval_batch")   # settings a resumed run may change: they do not affect training


def _training_part(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in EVAL_ONLY}


def _read_records(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_records(path, records):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _append(path, record):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def train(spec: str, config: TrainConfig | None = None, out_dir: str = "train_out", *, resume: bool = False,
          progress: bool = True, plot: bool = True, threads: int | None = None, label: str | None = None,
          stop_after: int | None = None) -> TrainResult:
    """Train the model of `spec` on `config.task`; write metrics, checkpoints and a plot under `out_dir`.

    `resume=True` continues from ``out_dir/checkpoint.pt`` when it exists (the configuration must match).
    `stop_after` ends the run after that many steps (as if interrupted; for tests and time-sliced runs).
    """
    cfg = config or TrainConfig()
    cfg.validate()
    task = cfg.make_task()
    prev_threads = set_threads(threads) if threads else None
    try:
        return _train(spec, cfg, task, out_dir, resume, progress, plot, label, stop_after)
    finally:
        if prev_threads:
            restore_threads(prev_threads)


def _train(spec, cfg, task, out_dir, resume, progress, plot, label, stop_after):
    import torch

    from .compiler import compile as seqc_compile

    os.makedirs(out_dir, exist_ok=True)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    label = label or os.path.splitext(os.path.basename(str(spec)))[0]

    torch.manual_seed(cfg.seed)
    params = dict(cfg.params)
    params["vocab"] = task.vocab
    model = seqc_compile(spec, backend="torch", params=params, seed=cfg.seed, training=True)
    n_params = count_params(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():   # SSM dynamics, norms and biases are not decayed (as in S4, Mamba)
        (no_decay if p.dim() < 2 or name.rsplit(".", 1)[-1] in NO_DECAY else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))

    start, elapsed = 0, 0.0
    records = []
    if resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, weights_only=False)
        if _training_part(ck["config"]) != _training_part(cfg.to_json()) or ck["spec_label"] != label:
            raise SeqcError(f"--resume: {ckpt_path} was written by a different configuration; use the same "
                            f"flags, or another --out directory")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["torch_rng"])
        start, elapsed = ck["step"], ck["elapsed"]
        records = [r for r in _read_records(metrics_path) if r.get("step", 0) <= start and "event" not in r]
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"spec": str(spec), "label": label, "n_params": n_params, **cfg.to_json()}, f, indent=1)
    _write_records(metrics_path, records)

    if start == 0:
        first = {"step": 0, "train_loss": None, "lr": cfg.lr * lr_factor(0, cfg), **evaluate(model, task, cfg),
                 "wall_s": 0.0}
        records.append(first)
        _append(metrics_path, first)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"{label} {task.name}", unit="step", dynamic_ncols=True,
                   leave=True)
    window, t0 = [], time.perf_counter()
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    model.train()
    for step in range(start, end):
        tokens, targets, mask = (torch.from_numpy(a) for a in task.batch(_batch_rng(cfg.seed, step), cfg.batch,
                                                                         cfg.length))
        loss = masked_loss(model(tokens), targets, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        value = loss.detach().item()
        if not math.isfinite(value):
            raise SeqcError(f"training diverged at step {step + 1}: loss {value}; lower --lr")
        window.append(value)
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
        if done % cfg.eval_every == 0 or done == cfg.steps:
            ev = evaluate(model, task, cfg)
            rec = {"step": done, "train_loss": float(np.mean(window)), "lr": opt.param_groups[0]["lr"], **ev,
                   "wall_s": round(elapsed + time.perf_counter() - t0, 3)}
            window = []
            records.append(rec)
            _append(metrics_path, rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}", acc=f"{ev['eval_acc']:.3f}")
            ck = {"step": done, "elapsed": rec["wall_s"], "config": cfg.to_json(), "spec_label": label,
                  "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                  "torch_rng": torch.get_rng_state()}
            torch.save(ck, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)
    if bar is not None:
        bar.close()

    if end == cfg.steps:
        if cfg.extrapolate:
            ext = {"event": "extrapolation", "train_length": cfg.length,
                   "acc": {str(m * cfg.length): evaluate(model, task, cfg, m * cfg.length)["eval_acc"]
                           for m in cfg.extrapolate}}
            records.append(ext)
            _append(metrics_path, ext)
        last = [r for r in records if "event" not in r][-1]
        fin = {"event": "final", "spec": str(spec), "label": label, "task": task.name, "n_params": n_params,
               "steps": cfg.steps, "eval_acc": last["eval_acc"], "eval_loss": last["eval_loss"],
               "chance_loss": task.chance_loss, "wall_s": last["wall_s"]}
        records.append(fin)
        _append(metrics_path, fin)
    if plot:
        plot_curves({label: records}, os.path.join(out_dir, "curves.png"),
                    title=f"{task.name} (L={cfg.length})", chance=task.chance_loss)
    return TrainResult(str(spec), out_dir, cfg, n_params, records, model)


def plot_curves(runs: dict, path: str, title: str = "", chance: float | None = None):
    """Training loss and evaluation accuracy against step, one line per run ({label: records})."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, records in runs.items():
        rows = [r for r in records if "event" not in r]
        steps = [r["step"] for r in rows]
        ax_l.plot([r["step"] for r in rows if r["train_loss"] is not None],
                  [r["train_loss"] for r in rows if r["train_loss"] is not None], label=label)
        ax_a.plot(steps, [r["eval_acc"] for r in rows], label=label)
    if chance is not None:
        ax_l.axhline(chance, color="gray", ls=":", lw=1, label="chance")
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("training loss")
    ax_a.set_xlabel("step")
    ax_a.set_ylabel("eval token accuracy")
    ax_a.set_ylim(0, 1.02)
    ax_l.legend(fontsize=8)
    ax_a.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_records(out_dir: str) -> list:
    """The records of a run directory (to redraw a plot or build a table)."""
    return _read_records(os.path.join(out_dir, "metrics.jsonl"))


# -- the `seqc train` command ------------------------------------------------------------------------------

def _o(*flags, **kw):
    return (flags, kw)


CLI_OPTIONS = [
    _o("--task", required=True, help="selective-copying | induction-heads"),
    _o("--quick", action="store_true", help="the small, fast setting (the CI learning check): --profile quick"),
    _o("--profile", default=None, help="quick | medium | default: the preset hyper-parameters that flags override"),
    _o("--out", default=None, help="output directory (default runs/TASK/SPEC_NAME[-PROFILE])"),
    _o("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists"),
    _o("--steps", type=int), _o("--length", "-L", type=int, help="training sequence length"),
    _o("--batch", "-B", type=int), _o("--lr", type=float), _o("--weight-decay", type=float),
    _o("--warmup", type=int), _o("--eval-every", type=int), _o("--eval-size", type=int),
    _o("--seed", type=int, default=0),
    _o("--n-tokens", type=int, help="selective copying: tokens to memorise"),
    _o("--n-data", type=int, help="number of distinct data tokens"),
    _o("--extrapolate", metavar="M1,M2,...", help="after training, evaluate at these multiples of --length"),
    _o("--stop-after", type=int, metavar="N", help="stop after N steps of this invocation (resume later)"),
    _o("--threads", type=int, default=None, help="torch CPU threads"),
    _o("--no-progress", action="store_true", help="no progress bar"),
]


def run_command(args) -> int:
    """`seqc train SPEC --task T [flags]`: train, print the result line; exit 0."""
    need_extras()
    if any(p.split("=", 1)[0].strip() == "vocab" for p in (args.param or ())):
        raise SeqcError("--param vocab: the vocabulary is set by the task; do not override it")
    from .cli import _params
    ext = None
    if args.extrapolate:
        try:
            ext = tuple(int(m) for m in args.extrapolate.split(","))
        except ValueError:
            raise SeqcError(f"--extrapolate takes comma-separated integers, got {args.extrapolate!r}") from None
    if args.quick and args.profile not in (None, "quick"):
        raise SeqcError(f"--quick contradicts --profile {args.profile}")
    profile = "quick" if args.quick else (args.profile or "default")
    cfg = TrainConfig.profile(args.task, profile, steps=args.steps, length=args.length, batch=args.batch,
                              lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
                              eval_every=args.eval_every, eval_size=args.eval_size, seed=args.seed,
                              n_tokens=args.n_tokens, n_data=args.n_data, extrapolate=ext,
                              params=_params(args.param))
    label = os.path.splitext(os.path.basename(str(args.file)))[0]
    out = args.out or os.path.join("runs", cfg.task, label + ("" if profile == "default" else "-" + profile))
    if args.stop_after is not None and args.stop_after < 1:
        raise SeqcError(f"--stop-after must be a positive integer, got {args.stop_after}")
    res = train(args.file, cfg, out, resume=args.resume, progress=not args.no_progress, threads=args.threads,
                stop_after=args.stop_after)
    fin = res.final
    if not fin:
        last = [r for r in res.records if "event" not in r][-1]
        print(f"{label}: stopped at step {last['step']}/{cfg.steps} (eval acc {last['eval_acc']:.3f}); "
              f"continue with --resume --out {out}")
        return 0
    print(f"{label} on {cfg.task} (L={cfg.length}, {res.n_params} parameters, {cfg.steps} steps, "
          f"{fin['wall_s']:.0f} s): eval token accuracy {fin['eval_acc']:.3f}, loss {fin['eval_loss']:.3f} "
          f"(chance {fin['chance_loss']:.3f})")
    ext_rec = next((r for r in res.records if r.get("event") == "extrapolation"), None)
    if ext_rec:
        print("  length extrapolation: " + ", ".join(f"L={k}: {v:.3f}" for k, v in ext_rec["acc"].items()))
    print(f"  metrics {os.path.join(out, 'metrics.jsonl')}, plot {os.path.join(out, 'curves.png')}")
    return 0
