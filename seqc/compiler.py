"""`seqc.compile`: spec -> IR -> pass pipeline -> lowered program -> a backend's model."""
from __future__ import annotations

import contextlib
import gc
import threading

from .analysis import build_graph
from .backend import get_backend
from .errors import SeqcError, did_you_mean
from .lower import lower
from .passes import Pipeline, PlanContext, run_pipeline

MODES = ("auto", "conv", "scan", "recurrent")
DEVICES = ("cpu", "cuda")


def check_choice(what: str, value, choices) -> str:
    if value not in choices:
        raise SeqcError(f"unknown {what} {value!r}{did_you_mean(str(value), choices)}; "
                        f"expected one of {', '.join(choices)}")
    return value


def plan_graph(spec, backend="torch", params=None, mode="auto", *, length=1024, batch=1, training=False,
               dtype=None, device=None, pipeline: Pipeline | None = None, instruments=None):
    """Elaborate and run the pass pipeline; returns the planned IR.  The planner's
    machine model comes from the backend for ``device`` (default cpu) and ``dtype``
    (default the backend's own)."""
    check_choice("mode", mode, MODES)
    be = get_backend(backend)
    device = check_choice("device", device or "cpu", DEVICES)
    dtype = dtype or be.default_dtype
    machine = be.machine(device, dtype)
    graph = spec if hasattr(spec, "nodes") and hasattr(spec, "dump") else build_graph(spec, params)
    ctx = PlanContext(batch=batch, length=length, backend=backend, training=training, dtype=dtype, mode=mode,
                      device=device, machine=machine)
    return run_pipeline(graph, ctx, pipeline, instruments)


def compile(spec, backend: str = "torch", params: dict | None = None, mode: str = "auto", *, seed: int = 0,
            length: int | None = None, batch: int = 1, training: bool = False, device: str | None = None,
            dtype: str | None = None, pipeline: Pipeline | None = None):
    """Compile a .seq spec (path or source) for a backend.

    ``mode`` forces one plan on every layer where it is legal ("conv" only
    applies to time-invariant layers).  With ``length=None`` (the default) a layer
    whose best plan depends on the sequence length picks it on every call from
    the actual shapes, through a threshold table the planner computes now; given
    ``length``/``batch``, the planner fixes the plans for those shapes.
    ``training=True`` plans for forward+backward.  ``device`` (cpu | cuda) and
    ``dtype`` (float32 by default on torch; numpy always computes in float64)
    choose the planner's machine model and where the model lives.
    Weights are the seeded default initialisation.
    """
    with _collector_paused():
        graph = plan_graph(spec, backend, params, mode, length=length, batch=batch, training=training,
                           pipeline=pipeline, device=device, dtype=dtype)
        be = get_backend(backend)
        program = lower(graph)
        check_supported(be, program)
        check_memory(graph, be, length, batch, dtype)       # before any weight is allocated
        return be.build(program, seed=seed, device=device or "cpu", dtype=dtype)


_GC_LOCK = threading.Lock()
_GC_STATE = {"depth": 0, "was_enabled": False}


@contextlib.contextmanager
def _collector_paused():
    """Python's cycle collector off while compiling (as it was before, afterwards).  A
    compile allocates tens of thousands of small objects that live until it ends; the
    collections they trigger scan every object of the process (sympy's caches, torch's
    modules) and made a warm compile of the 48-layer hybrid take 0.21-0.40 s instead of
    0.2.  Nested and concurrent compiles share one pause: the last to finish restores the
    collector's state from before the first."""
    with _GC_LOCK:
        if _GC_STATE["depth"] == 0:
            _GC_STATE["was_enabled"] = gc.isenabled()
            gc.disable()
        _GC_STATE["depth"] += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC_STATE["depth"] -= 1
            if _GC_STATE["depth"] == 0 and _GC_STATE["was_enabled"]:
                gc.enable()


def check_memory(graph, be, length, batch, dtype) -> None:
    """Refuse (SeqcError naming SEQC_MAX_MEMORY) a model whose weights - and, when
    ``length`` is given, one forward pass's activations at ``batch`` x ``length`` - would
    not fit, as ``seqc run`` does, before the backend allocates anything."""
    from dataclasses import replace

    from .memory import check_fits, estimate
    itemsize = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}.get(dtype or be.default_dtype, 4)
    est = estimate(graph, batch, length or 1, itemsize)
    check_fits(est if length is not None else replace(est, activations=0), flag=None)


def check_supported(be, program) -> None:
    """Every call must be one the backend can run (SeqcError at the first that is not)."""
    for c in program.calls:
        if not be.supports(c):
            raise SeqcError(f"the {be.name} backend has no implementation of '{c.op}'", c.span)
