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
    _opt("--device", default="cpu", help="cpu | cuda (the planner's machine model)"),
    _opt("--dtype", default=None, help="float64 | float32 | bfloat16 | float16 (default: the backend's)"),
]


def _itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name (for memory estimates)."""
    return {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)


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
                      training=args.training, pipeline=pipeline, instruments=instruments, device=args.device,
                      dtype=args.dtype)


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
    from .backend import get_backend
    from .passes import explain
    from .passes.manager import PlanContext
    from .memory import estimate
    g = _plan(args)
    be = get_backend(args.backend)
    dtype = args.dtype or be.default_dtype
    ctx = PlanContext(batch=args.batch, length=args.length, backend=args.backend, training=args.training,
                      mode=args.mode, device=args.device, dtype=dtype, machine=be.machine(args.device, dtype))
    sys.stdout.write(explain(g, ctx))
    print(estimate(g, args.batch, args.length, _itemsize(dtype)))
    return 0


cmd_explain.options = _PLAN_OPTS


@command("emit", "print the generated source for a backend")
def cmd_emit(args) -> int:
    from .backend import get_backend
    from .lower import lower
    g = _plan(args)
    sys.stdout.write(get_backend(args.backend).emit(lower(g)))
    return 0


cmd_emit.options = _PLAN_OPTS


@command("run", "run a model on seeded random input and print output shape and statistics")
def cmd_run(args) -> int:
    import numpy as np

    from .analysis import build_graph
    from .backend import get_backend
    from .compiler import compile
    from .memory import check_fits, estimate
    B, L = _positive("batch", args.batch), _positive("length", args.length)
    be = get_backend(args.backend)
    seed = _seed(args.seed)
    if args.max_memory is not None and not args.max_memory > 0:
        raise SeqcError(f"--max-memory must be a positive number of bytes, got {args.max_memory}")
    graph = build_graph(args.file, _params(args.param))
    check_fits(estimate(graph, B, L, _itemsize(be.default_dtype)), args.max_memory)  # before allocating
    model = compile(graph, backend=args.backend, mode=args.mode, seed=seed, length=L, batch=B, training=False)
    if hasattr(model, "eval"):
        model.eval()   # inference: dropout off
    graph = model.graph
    xs = random_inputs(graph, B, L, np.random.default_rng(seed))
    t0 = time.perf_counter()
    ys = be.forward(model, xs)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    be.forward(model, xs)
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


@command("difftest", "run two backends (or plans) on the same weights and inputs; compare every node, the "
                     "gradients of inputs and parameters, and stepping against the forward pass")
def cmd_difftest(args) -> int:
    from .differential import difftest
    _seed(args.seed)
    backends = tuple(b.strip() for b in args.backends.split(","))
    modes = tuple(m.strip() for m in args.modes.split(",")) if args.modes else ("auto",) * len(backends)
    if len(modes) != len(backends):
        raise SeqcError(f"--modes needs one mode per backend ({len(backends)}), got {len(modes)}")
    report = difftest(args.file, backends, _params(args.param), seed=args.seed, dtype=args.dtype,
                      batch=_positive("batch", args.batch), length=_positive("length", args.length),
                      modes=modes, tolerance=args.tolerance, grads=not args.no_grads, step=not args.no_step)
    print(report)
    return 0 if report.ok else 1


cmd_difftest.options = [
    _opt("--backends", default="numpy,torch", help="two backends, comma-separated (the same one twice with "
         "--modes compares two plans)"),
    _opt("--modes", default=None, help="plan modes for the two runs, e.g. conv,scan"),
    _opt("--dtype", default="float64", help="float64 | float32 | bfloat16 (sets the tolerances)"),
    _opt("--length", "-L", type=int, default=16),
    _opt("--batch", "-B", type=int, default=2),
    _opt("--seed", type=int, default=0),
    _opt("--tolerance", type=str, default=None, help="relative tolerance on values (default: by dtype)"),
    _opt("--no-grads", action="store_true", help="skip the gradient comparison"),
    _opt("--no-step", action="store_true", help="skip stepping against the forward pass"),
]


@command("bench", "time forward, forward+backward and per-token step of a compiled spec for each plan")
def cmd_bench(args) -> int:
    from .benchmark import bench
    from .backend import get_backend
    if not get_backend(args.backend).autograd:
        raise SeqcError(f"bench times forward+backward and needs an autograd backend; --backend {args.backend} "
                        f"has none (use --backend torch)")
    rows = bench(args.file, _params(args.param), backend=args.backend, length=_positive("length", args.length),
                 batch=_positive("batch", args.batch), repeat=_positive("repeat", args.repeat),
                 steps=_positive("steps", args.steps), modes=tuple(args.modes.split(",")))
    from .benchmark import table
    print(table(rows))
    return 0


cmd_bench.options = [
    _opt("--backend", default="torch", help="numpy | torch | triton"),
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


@command("train", "train the spec's model on a synthetic task (selective copying, induction heads)")
def cmd_train(args) -> int:
    from .train import run_command
    return run_command(args)


def _train_options():
    from .train import CLI_OPTIONS
    return CLI_OPTIONS


cmd_train.options = _train_options()
