"""Sub-commands beyond check and graph: passes, explain, emit, run (and the
later-stage difftest, bench), each registered with ``cli.command``."""
from __future__ import annotations

import sys
import time

from .cli import _params, command
from .errors import SeqcError
from .inputs import as_list, random_inputs


def _opt(*flags, **kw):
    return (flags, kw)


_PLAN_OPTS = [
    _opt("--length", "-L", type=int, default=1024, help="sequence length to plan for"),
    _opt("--batch", "-B", type=int, default=1, help="batch size to plan for"),
    _opt("--backend", default="torch", help="numpy | torch | triton"),
    _opt("--mode", default="auto", help="auto | conv | scan | recurrent"),
    _opt("--training", action="store_true", help="plan for forward+backward instead of inference"),
]


def _positive(name, v):
    if v is None or v < 1:
        raise SeqcError(f"--{name} must be a positive integer, got {v}")
    if v > 2 ** 40:
        raise SeqcError(f"--{name} {v} is too large (at most {2 ** 40})")
    return v


def _seed(v):
    if v is None or not 0 <= v < 2 ** 63:
        raise SeqcError(f"--seed must be a non-negative integer below 2**63, got {v}")
    return v


def _plan(args, instruments=None, pipeline=None, graph=None):
    """Run the pipeline on the spec (or on `graph`, its already elaborated IR)."""
    from .compiler import plan_graph
    return plan_graph(graph if graph is not None else args.file, args.backend, _params(args.param), args.mode,
                      length=_positive("length", args.length), batch=_positive("batch", args.batch),
                      training=args.training, pipeline=pipeline, instruments=instruments)


@command("passes", "list the pass pipeline and dump the IR between passes")
def cmd_passes(args) -> int:
    from .passes import PASSES, Instruments, Pipeline
    pipeline = Pipeline.parse(args.pipeline) if args.pipeline else Pipeline()
    for name in args.drop or ():
        pipeline.drop(name)
    for name in (args.print_after or []) + (args.print_before or []):
        if name not in PASSES:
            from .passes.manager import _get
            _get(name)
    ins = Instruments(print_after_all=args.print_after_all, print_after=tuple(args.print_after or ()),
                      print_before=tuple(args.print_before or ()), time_passes=args.time_passes,
                      out=lambda s: sys.stdout.write(s + ("\n" if not s.endswith("\n") else "")))
    if not (args.print_after_all or args.print_after or args.print_before or args.time_passes):
        print(f"pipeline: {pipeline}")
        for i, name in enumerate(pipeline.names):
            print(f"  {i:2d}. {name:<22} {PASSES[name].doc}")
        return 0
    graph = None
    if args.print_after_all:
        from .analysis import build_graph
        graph = build_graph(args.file, _params(args.param))
        sys.stdout.write("// ----- IR after elaboration -----\n" + graph.dump())
    _plan(args, ins, pipeline, graph)
    return 0


cmd_passes.options = _PLAN_OPTS + [
    _opt("--print-after-all", action="store_true", help="dump the IR after every pass"),
    _opt("--print-after", action="append", metavar="PASS", help="dump the IR after PASS"),
    _opt("--print-before", action="append", metavar="PASS", help="dump the IR before PASS"),
    _opt("--time-passes", action="store_true", help="report the time spent in each pass"),
    _opt("--pipeline", metavar="P1,P2,...", help="run this pipeline instead of the default"),
    _opt("--drop", action="append", metavar="PASS", help="drop a pass from the pipeline"),
]


@command("explain", "show, per layer, the plans considered, their predicted cost and the winner")
def cmd_explain(args) -> int:
    from .passes import explain
    from .passes.manager import PlanContext
    from .memory import estimate
    g = _plan(args)
    ctx = PlanContext(batch=args.batch, length=args.length, backend=args.backend, training=args.training,
                      mode=args.mode)
    sys.stdout.write(explain(g, ctx))
    print(estimate(g, args.batch, args.length, 8 if args.backend == "numpy" else 4))
    return 0


cmd_explain.options = _PLAN_OPTS


@command("emit", "print the generated source for a backend")
def cmd_emit(args) -> int:
    g = _plan(args)
    if args.backend == "numpy":
        from .backends.numpy.codegen import emit
    else:
        from .backends.torch.codegen import emit
    sys.stdout.write(emit(g))
    return 0


cmd_emit.options = _PLAN_OPTS


@command("run", "run a model on seeded random input and print output shape and statistics")
def cmd_run(args) -> int:
    import numpy as np

    from .analysis import build_graph
    from .compiler import check_choice, compile
    from .memory import check_fits, estimate
    B, L = _positive("batch", args.batch), _positive("length", args.length)
    check_choice("backend", args.backend, ("numpy", "torch", "triton"))
    seed = _seed(args.seed)
    if args.max_memory is not None and not args.max_memory > 0:
        raise SeqcError(f"--max-memory must be a positive number of bytes, got {args.max_memory}")
    graph = build_graph(args.file, _params(args.param))
    check_fits(estimate(graph, B, L, 8 if args.backend == "numpy" else 4), args.max_memory)  # before allocating
    model = compile(graph, backend=args.backend, mode=args.mode, seed=seed, length=L, batch=B, training=False)
    if hasattr(model, "eval"):
        model.eval()   # inference: dropout off
    graph = model.graph
    xs = random_inputs(graph, B, L, np.random.default_rng(seed))
    if args.backend == "numpy":
        def forward():
            return as_list(model(*xs, model.weights))
    else:
        import torch
        ts = [torch.as_tensor(x) if x.dtype.kind == "i" else torch.as_tensor(x, dtype=torch.float32) for x in xs]

        def forward():
            with torch.no_grad():
                return [y.float().numpy() for y in as_list(model(*ts))]
    t0 = time.perf_counter()
    ys = forward()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    forward()
    second = time.perf_counter() - t0
    print(f"model {graph.name} on {args.backend}: input {' '.join(str(tuple(x.shape)) for x in xs)} -> "
          f"output {' '.join(str(tuple(np.shape(y))) for y in ys)}")
    finite = True
    for k, y in enumerate(ys):
        y = np.asarray(y, dtype=np.float64)
        finite &= bool(np.isfinite(y).all())
        label = f"  output {k}:" if len(ys) > 1 else " "
        print(f"{label} mean {y.mean():+.6f}  std {y.std():.6f}  min {y.min():+.6f}  max {y.max():+.6f}  "
              f"finite {bool(np.isfinite(y).all())}")
    print(f"  forward {second * 1e3:.1f} ms (first call {first * 1e3:.1f} ms, includes one-time compilation and "
          f"warm-up)")
    return 0 if finite else 1


cmd_run.options = [
    _opt("--backend", default="torch", help="numpy | torch | triton (default torch, like seqc.compile)"),
    _opt("--max-memory", type=float, default=None, metavar="BYTES",
         help="refuse a run whose estimated weights + activations exceed BYTES (default SEQC_MAX_MEMORY or 8 GiB)"),
    _opt("--length", "-L", type=int, default=64),
    _opt("--batch", "-B", type=int, default=2),
    _opt("--seed", type=int, default=0),
    _opt("--mode", default="auto", help="auto | conv | scan | recurrent"),
]


@command("difftest", "run two backends on the same weights and inputs and compare every node")
def cmd_difftest(args) -> int:
    from .differential import difftest
    import math
    if not (math.isfinite(args.tolerance) and args.tolerance > 0):
        raise SeqcError(f"--tolerance must be a positive finite number, got {args.tolerance}")
    _seed(args.seed)
    backends = tuple(b.strip() for b in args.backends.split(","))
    modes = tuple(m.strip() for m in args.modes.split(",")) if args.modes else ("auto",) * len(backends)
    if len(modes) != len(backends):
        raise SeqcError(f"--modes needs one mode per backend ({len(backends)}), got {len(modes)}")
    report = difftest(args.file, backends, _params(args.param), seed=args.seed,
                      batch=_positive("batch", args.batch), length=_positive("length", args.length),
                      modes=modes, tolerance=args.tolerance)
    print(report)
    return 0 if report.ok else 1


cmd_difftest.options = [
    _opt("--backends", default="numpy,torch", help="two backends, comma-separated"),
    _opt("--modes", default=None, help="plan modes for the two runs, e.g. conv,scan"),
    _opt("--length", "-L", type=int, default=16),
    _opt("--batch", "-B", type=int, default=2),
    _opt("--seed", type=int, default=0),
    _opt("--tolerance", type=float, default=1e-8),
]


@command("bench", "time forward, forward+backward and per-token step of a compiled spec for each plan")
def cmd_bench(args) -> int:
    from .benchmark import bench
    if args.backend != "torch":
        raise SeqcError(f"bench times forward+backward and needs an autograd backend; --backend {args.backend} "
                        f"has none (use --backend torch)")
    rows = bench(args.file, _params(args.param), backend=args.backend, length=_positive("length", args.length),
                 batch=_positive("batch", args.batch), repeat=_positive("repeat", args.repeat),
                 steps=_positive("steps", args.steps), modes=tuple(args.modes.split(",")))
    from .benchmark import table
    print(table(rows))
    return 0


cmd_bench.options = [
    _opt("--backend", default="torch", help="numpy | torch"),
    _opt("--length", "-L", type=int, default=1024),
    _opt("--batch", "-B", type=int, default=2),
    _opt("--repeat", type=int, default=3),
    _opt("--steps", type=int, default=32, help="tokens to decode for the per-token figure"),
    _opt("--modes", default="auto,conv,scan,recurrent", help="plans to time (comma-separated)"),
]


@command("fmt", "print the spec in canonical form (comments are kept)")
def cmd_fmt(args) -> int:
    from .fmt import format_source
    spec = args.file
    original = spec.source if spec.path is None else None
    if original is None:
        from .parser import read_spec_bytes
        original = read_spec_bytes(spec.path)
    text = format_source(original, spec.name, quote=spec.path is None or spec.name.endswith(".seq"))
    original = original.decode("utf-8") if isinstance(original, bytes) else original   # valid: it parsed
    if args.check:
        return 0 if original == text else 1
    sys.stdout.write(text)
    return 0


cmd_fmt.options = [_opt("--check", action="store_true", help="exit 1 if the file is not already formatted")]


@command("import", "print the .seq spec of a Hugging Face save_pretrained directory or a mamba_ssm checkpoint")
def cmd_import(args) -> int:
    from .interop import spec_for
    sys.stdout.write(spec_for(args.path))
    return 0


cmd_import.takes_spec = False
cmd_import.options = [_opt("path", help="a save_pretrained directory (config.json + weights) or a checkpoint file")]


@command("ops", "list the ops, print one op's reference (seqc ops NAME), or the whole reference (--markdown)")
def cmd_ops(args) -> int:
    from .ops import OPS
    from .reference import describe, markdown, signature
    if args.markdown:
        sys.stdout.write(markdown())
    elif args.name:
        sys.stdout.write(describe(args.name))
    else:
        for name in sorted(OPS):
            print(signature(OPS[name]))
    return 0


cmd_ops.takes_spec = False
cmd_ops.options = [_opt("name", nargs="?", help="an op name"),
                   _opt("--markdown", action="store_true", help="the whole language reference as Markdown")]
