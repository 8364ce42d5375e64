"""Training step time, eager vs ``torch.compile(model, dynamic=True)`` (inductor), for each
example at its default size (the spec's own parameters): batch 8, length 256, one SGD step =
forward + backward + update.  Each example runs in a fresh process: in one long process the
compiled graphs of the earlier examples stay alive, and every later step pays for them in the
cycle collector (measured: GLA's eager step 20 -> 28 ms when it ran twelfth).  The compiled
model is warmed up on two other lengths first (so
the timed length runs the dynamic-shape graphs; the frames recompiled at the timed length
are counted and reported), then the two are timed alternately (``compare_ms``); ratio = compiled / eager (below 1: compiled is faster).

    python -m benchmarks.bench_compile_train [--examples s4d,mamba] [--length 256] [--batch 8]
Writes compile_train.json.
"""
from __future__ import annotations

import copy
import json
import os
import time

from benchmarks.common import add_output_options, compare_ms, in_subprocess, save, set_output

EXAMPLES = ("mamba", "s4d", "lstm", "gru", "attention", "transformer", "hybrid", "s5", "h3", "llama", "gla",
            "griffin", "classifier", "mamba2")


def _input(model, batch, length, gen):
    import torch
    name, shape, dtype = model._inputs[0]
    if dtype == "int":
        return torch.randint(0, model._vocab[name], (batch, length), generator=gen)
    return torch.randn(batch, length, int(shape[-1]), generator=gen)


def _stepper(model, forward, x):
    import torch
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        loss = forward(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def measure(name, batch, length, repeat):
    import torch
    import torch._dynamo
    import seqc
    torch.manual_seed(0)
    eager = seqc.compile(os.path.join("examples", f"{name}.seq"))
    twin = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(twin, dynamic=True)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for warm in (length // 2, length // 2 + 8):            # compile (dynamic shapes) on other lengths
        _stepper(twin, compiled, _input(twin, batch, warm, gen))()
    compile_s = time.perf_counter() - t0
    x = _input(eager, batch, length, gen)
    from torch._dynamo.utils import counters
    frames = counters["frames"]["ok"]
    e_ms, c_ms = compare_ms(_stepper(eager, eager, x), _stepper(twin, compiled, x), repeat=repeat)
    return {"example": name, "eager_ms": e_ms, "compiled_ms": c_ms, "ratio": c_ms / e_ms, "compile_s": compile_s,
            "recompiled_frames_at_timed_length": counters["frames"]["ok"] - frames}


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", default=",".join(EXAMPLES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)   # one example, in this process
    add_output_options(ap)
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(measure(args.examples, args.batch, args.length, args.repeat)))
        return
    set_output(args)
    import torch
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, length {args.length}")
    for name in args.examples.split(","):
        try:
            row = in_subprocess("benchmarks.bench_compile_train", "--probe", "--examples", name, "--batch",
                                args.batch, "--length", args.length, "--repeat", args.repeat)
        except Exception as exc:   # report and go on: one example's failure is a result too
            lines = str(exc).strip().splitlines() or [""]
            row = {"example": name, "error": f"{type(exc).__name__}: {lines[-1][:200]}"}
            print(f"{name:12s} FAILED {row['error']}")
        else:
            print(f"{name:12s} eager {row['eager_ms']:8.2f} ms  compiled {row['compiled_ms']:8.2f} ms  "
                  f"ratio {row['ratio']:.2f}  (compile {row['compile_s']:.0f} s, "
                  f"{row['recompiled_frames_at_timed_length']} frames recompiled at the timed length)")
        rows.append(row)
    print("wrote", save("compile_train.json", {"batch": args.batch, "length": args.length, "rows": rows}))


if __name__ == "__main__":
    main()
