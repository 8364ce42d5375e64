"""`seqc.compile`: spec -> IR -> pass pipeline -> a backend's model."""
from __future__ import annotations

from .analysis import build_graph
from .errors import SeqcError, did_you_mean
from .passes import Pipeline, PlanContext, run_pipeline

BACKENDS = ("numpy", "torch", "triton")
MODES = ("auto", "conv", "scan", "recurrent")


def check_choice(what: str, value, choices) -> str:
    if value not in choices:
        raise SeqcError(f"unknown {what} {value!r}{did_you_mean(str(value), choices)}; "
                        f"expected one of {', '.join(choices)}")
    return value


def plan_graph(spec, backend="torch", params=None, mode="auto", *, length=1024, batch=1, training=False,
               dtype="float32", pipeline: Pipeline | None = None, instruments=None):
    """Elaborate and run the pass pipeline; returns the planned IR."""
    check_choice("backend", backend, BACKENDS)
    check_choice("mode", mode, MODES)
    if backend == "triton":
        raise SeqcError("the triton backend is not available yet (planned: fused kernels generated from the "
                        "fusion regions); use backend='torch' or 'numpy'")
    graph = spec if hasattr(spec, "nodes") and hasattr(spec, "dump") else build_graph(spec, params)
    ctx = PlanContext(batch=batch, length=length, backend=backend, training=training, dtype=dtype, mode=mode)
    return run_pipeline(graph, ctx, pipeline, instruments)


def compile(spec, backend: str = "torch", params: dict | None = None, mode: str = "auto", *, seed: int = 0,
            length: int | None = None, batch: int = 1, training: bool = False, pipeline: Pipeline | None = None):
    """Compile a .seq spec (path or source) for a backend.

    ``mode`` forces one plan on every layer where it is legal ("conv" only
    applies to time-invariant layers).  With ``length=None`` (the default) a layer
    whose best plan depends on the sequence length picks it on every call from
    the actual shapes; given ``length``/``batch``, the planner fixes the plans for
    those shapes.  ``training=True`` plans for forward+backward.
    Weights are the seeded default initialisation.
    """
    graph = plan_graph(spec, backend, params, mode, length=length, batch=batch, training=training,
                       pipeline=pipeline)
    from .init import init_weights

    if backend == "numpy":
        from .backends.numpy.codegen import NumpyModel
        return NumpyModel(graph, seed=seed)
    from .backends.torch.module import build_module
    return build_module(graph, init_weights(graph, seed=seed))
