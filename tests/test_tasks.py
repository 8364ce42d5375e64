"""Training seqc-compiled models on the synthetic tasks: the generators build what
the tasks define, runs are deterministic, --resume continues exactly, the command
reports user mistakes plainly, and (the learning check) in the quick setting the
selective model learns selective copying while the time-invariant one does not."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from seqc import SeqcError
from seqc.tasks import get_task
from seqc.tasks.selective_copying import FIRST, MARKER, NOISE
from seqc.train import TrainConfig, lr_factor, train

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "examples" / "tasks"


# -- generators -----------------------------------------------------------------------------------------------

def test_selective_copying_batch_is_the_task():
    task = get_task("selective-copying", n_tokens=5, n_data=6)
    tokens, targets, mask = task.batch(np.random.default_rng(3), 64, 40)
    assert tokens.shape == targets.shape == mask.shape == (64, 40)
    for row_t, row_y, row_m in zip(tokens, targets, mask):
        head, tail = row_t[:35], row_t[35:]
        data = head[head != NOISE]
        assert len(data) == 5 and ((data >= FIRST) & (data < FIRST + 6)).all()   # k data tokens among noise
        assert (tail == MARKER).all() and MARKER not in head
        assert list(np.flatnonzero(row_m)) == list(range(35, 40))
        assert list(row_y[row_m]) == list(data)                                   # recalled in order
    # data positions vary between rows (the spacing is random, not a fixed pattern)
    assert len({tuple(np.flatnonzero(r[:35])) for r in tokens}) > 50
    assert task.vocab == 8 and math.isclose(task.chance_loss, math.log(6))


def test_induction_heads_batch_is_the_task():
    task = get_task("induction_heads", n_data=7)
    tokens, targets, mask = task.batch(np.random.default_rng(4), 128, 30)
    assert (tokens[:, -1] == 0).all() and mask[:, -1].all() and mask.sum() == 128
    for row_t, row_y in zip(tokens, targets):
        where = np.flatnonzero(row_t[:-1] == 0)
        assert len(where) == 1 and where[0] < 28                       # one earlier trigger, answer after it
        assert row_y[-1] == row_t[where[0] + 1] and 1 <= row_y[-1] <= 7
    assert task.vocab == 8


def test_task_errors_are_seqc_errors():
    with pytest.raises(SeqcError, match="unknown task 'copying'"):
        get_task("copying")
    with pytest.raises(SeqcError, match="at least 32"):
        TrainConfig.profile("selective_copying", "quick", length=20, n_tokens=16)
    with pytest.raises(SeqcError, match="positive"):
        TrainConfig.profile("induction_heads", "quick", steps=0)


def test_schedule_is_warmup_then_cosine():
    cfg = TrainConfig(steps=110, warmup=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)       # half-way through the cosine
    assert lr_factor(110, cfg) == pytest.approx(0.1)


# -- determinism and resume -----------------------------------------------------------------------------------

TINY = dict(length=24, n_tokens=3, n_data=4, batch=8, steps=6, warmup=2, eval_every=2, eval_size=16, eval_batch=8,
            params={"d_model": 16, "n_layers": 1})


def _rows(records):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


@pytest.mark.parametrize("spec", ["mamba", "s4d"])
def test_same_seed_same_metrics_and_resume_is_exact(tmp_path, spec):
    cfg = TrainConfig.profile("selective_copying", "quick", **TINY)
    a = train(str(SPECS / f"{spec}.seq"), cfg, str(tmp_path / "a"), progress=False, plot=False)
    b = train(str(SPECS / f"{spec}.seq"), cfg, str(tmp_path / "b"), progress=False, plot=False)
    assert _rows(a.records) == _rows(b.records)
    assert [r["step"] for r in a.records if "step" in r] == [0, 2, 4, 6]
    # interrupted after 2 steps (one checkpoint), then again after 2 more, then finished
    c_dir = str(tmp_path / "c")
    part = train(str(SPECS / f"{spec}.seq"), cfg, c_dir, progress=False, plot=False, stop_after=3)
    assert not part.final and [r["step"] for r in part.records] == [0, 2]
    train(str(SPECS / f"{spec}.seq"), cfg, c_dir, resume=True, progress=False, plot=False, stop_after=2)
    c = train(str(SPECS / f"{spec}.seq"), cfg, c_dir, resume=True, progress=False, plot=False)
    assert _rows(c.records) == _rows(a.records)
    with open(os.path.join(c_dir, "metrics.jsonl")) as f:
        assert _rows([json.loads(line) for line in f]) == _rows(a.records)
    for (k, v), (k2, v2) in zip(a.model.state_dict().items(), c.model.state_dict().items()):
        assert k == k2 and bool((v == v2).all()), k
    # another seed gives another run
    d = train(str(SPECS / f"{spec}.seq"), TrainConfig.profile("selective_copying", "quick", **{**TINY, "seed": 1}),
              str(tmp_path / "d"), progress=False, plot=False)
    assert _rows(d.records) != _rows(a.records)


def test_resume_refuses_another_configuration(tmp_path):
    cfg = TrainConfig.profile("selective_copying", "quick", **TINY)
    train(str(SPECS / "lstm.seq"), cfg, str(tmp_path), progress=False, plot=False, stop_after=2)
    other = TrainConfig.profile("selective_copying", "quick", **{**TINY, "lr": 1e-4})
    with pytest.raises(SeqcError, match="different configuration"):
        train(str(SPECS / "lstm.seq"), other, str(tmp_path), resume=True, progress=False, plot=False)
    # evaluation-only settings may change: a finished run is re-evaluated at other lengths without training
    done = train(str(SPECS / "lstm.seq"), cfg, str(tmp_path), resume=True, progress=False, plot=False)
    again = TrainConfig.profile("selective_copying", "quick", **{**TINY, "extrapolate": (1, 2), "eval_batch": 4})
    ext = train(str(SPECS / "lstm.seq"), again, str(tmp_path), resume=True, progress=False, plot=False)
    assert _rows([r for r in ext.records if "event" not in r]) == _rows([r for r in done.records if "event" not in r])
    acc = next(r for r in ext.records if r.get("event") == "extrapolation")["acc"]
    assert set(acc) == {"24", "48"} and acc["24"] == done.final["eval_acc"]


# -- the command ----------------------------------------------------------------------------------------------

def _seqc(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "seqc", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_train_command_runs_writes_and_reports(tmp_path):
    out = tmp_path / "run"
    p = _seqc("train", str(SPECS / "lstm.seq"), "--task", "induction-heads", "--quick", "--steps", "4",
              "--eval-every", "2", "--eval-size", "16", "--length", "12", "--extrapolate", "1,2",
              "--out", str(out), "--no-progress", "-p", "hidden=16", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "eval token accuracy" in p.stdout and "L=24" in p.stdout
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in lines] == [0, 2, 4, None, None]
    assert lines[-2]["event"] == "extrapolation" and set(lines[-2]["acc"]) == {"12", "24"}
    assert lines[-1]["event"] == "final" and lines[-1]["n_params"] == json.loads(
        (out / "config.json").read_text())["n_params"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--task", "copy"], "unknown task 'copy'"),
    (["--task", "selective-copying", "-p", "vocab=4"], "vocabulary is set by the task"),
    (["--task", "selective-copying", "--lr", "-1"], "--lr must be positive"),
    (["--task", "induction-heads", "--extrapolate", "2,x"], "comma-separated integers"),
])
def test_train_command_user_mistakes(tmp_path, args, message):
    p = _seqc("train", str(SPECS / "lstm.seq"), *args, "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_missing_extras_is_a_clear_error(monkeypatch):
    import builtins

    from seqc.train import need_extras
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "tqdm":
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(SeqcError, match=r"needs tqdm: pip install 'seqc\[train\]'"):
        need_extras()


# -- the learning check (the --quick setting) -----------------------------------------------------------------

def test_quick_learning_check_selective_beats_time_invariant(tmp_path):
    """Induction heads, quick profile, seed 0: the selective model (Mamba) learns the task -- loss far below
    chance, near-perfect recall, also at 4x the training length -- while the time-invariant S4D stays near
    chance.  Fails if gradients, the selective scan or the training loop are broken."""
    import time
    res, t0 = {}, time.process_time()
    for spec in ("mamba", "s4d"):
        cfg = TrainConfig.profile("induction_heads", "quick")
        res[spec] = train(str(SPECS / f"{spec}.seq"), cfg, str(tmp_path / spec), progress=False, plot=False,
                          threads=1)
    chance = res["mamba"].final["chance_loss"]
    m, s = res["mamba"].final, res["s4d"].final
    assert m["eval_loss"] < 0.1 * chance and m["eval_acc"] > 0.95, m
    ext = next(r for r in res["mamba"].records if r.get("event") == "extrapolation")["acc"]
    assert min(ext.values()) > 0.9, ext
    assert s["eval_acc"] < 0.4 and m["eval_acc"] > s["eval_acc"] + 0.5, (m, s)
    print(f"quick learning check: {time.process_time() - t0:.1f} s CPU; mamba {m['eval_acc']:.3f}, "
          f"s4d {s['eval_acc']:.3f}")


_ONE_THREAD = r"""
import os, sys, torch
from seqc.train import TrainConfig, train
cfg = TrainConfig.profile("selective_copying", "quick", steps=3, eval_every=3, eval_size=32)
train(sys.argv[1], cfg, sys.argv[2], progress=False, plot=False, threads=1)
print(len(os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_training_on_one_thread_starts_no_spinning_workers(tmp_path):
    """Bug caught: `train(threads=1)` set numba's thread count before the first kernel launch, which
    started numba's OpenMP pool with a worker per core; the idle worker then spun on the other core
    (4x the CPU time per step, half the speed of two runs side by side).  With one thread asked
    for, the process keeps its one thread."""
    p = subprocess.run([sys.executable, "-c", _ONE_THREAD, str(SPECS / "mamba.seq"), str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=600, cwd=str(ROOT),
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split()[-1] == "1", p.stdout
