"""Compiler passes over the graph IR and the pipeline that runs them.

Importing this package registers every pass; ``DEFAULT_PIPELINE`` lists the order.
"""
from . import cleanup, discretize, fusion, planner  # noqa: F401  (register passes)
from .manager import DEFAULT_PIPELINE, PASSES, Instruments, Pipeline, PlanContext, run_pipeline
from .planner import explain

__all__ = ["DEFAULT_PIPELINE", "PASSES", "Instruments", "Pipeline", "PlanContext", "run_pipeline", "explain"]
