"""The pass manager: named passes IR -> IR in one ordered pipeline, the verifier
after each, and instruments (print before/after, time per pass).

A pass is a function ``(graph, ctx) -> graph`` registered with ``@compiler_pass``.
Passes may mutate the graph they are given; the manager hands each one a
working copy once, so the caller's graph is never changed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import SeqcError, did_you_mean

PASSES: dict[str, "Pass"] = {}


@dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable
    doc: str


def compiler_pass(name: str):
    def deco(fn):
        PASSES[name] = Pass(name, fn, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "")
        return fn
    return deco


@dataclass
class PlanContext:
    """What the planner knows about the run: shapes, backend, training, device, dtype and the
    backend's machine model for them."""

    batch: int = 1
    length: int | None = 1024   # None: unknown until run time (plans may stay "auto")
    backend: str = "torch"
    training: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    mode: str = "auto"           # auto | conv | scan | recurrent (forces a plan where legal)
    machine: dict | None = None  # the backend's machine model; None: asked from the backend


@dataclass
class Instruments:
    print_after_all: bool = False
    print_after: tuple[str, ...] = ()
    print_before: tuple[str, ...] = ()
    time_passes: bool = False
    out: Callable[[str], None] = print
    timings: list[tuple[str, float]] = field(default_factory=list)


DEFAULT_PIPELINE = ("fold-identities", "eliminate-dead-code", "share-subexpressions", "fuse-elementwise",
                    "discretize", "plan", "mark-fusion-regions")


class Pipeline:
    """An ordered list of pass names; users may add or drop passes."""

    def __init__(self, names=DEFAULT_PIPELINE):
        self.names = list(names)
        for n in self.names:
            _get(n)

    @classmethod
    def parse(cls, text: str) -> "Pipeline":
        return cls([p.strip() for p in text.split(",") if p.strip()])

    def add(self, name: str, after: str | None = None) -> "Pipeline":
        _get(name)
        if after is None:
            self.names.append(name)
        else:
            self.names.insert(self.names.index(after) + 1, name)
        return self

    def drop(self, name: str) -> "Pipeline":
        _get(name)
        if name in self.names:
            self.names.remove(name)
        return self

    def __str__(self) -> str:
        return ",".join(self.names)

    def run(self, graph, ctx: PlanContext | None = None, instruments: Instruments | None = None):
        ctx = ctx or PlanContext()
        ins = instruments or Instruments()
        g = graph.copy()
        done = []
        for name in self.names:
            p = PASSES[name]
            if name in ins.print_before:
                ins.out(f"// ----- IR before {name} -----\n{g.dump()}")
            t0 = time.perf_counter()
            g = p.fn(g, ctx) or g
            dt = time.perf_counter() - t0
            ins.timings.append((name, dt))
            try:
                g.verify()
            except AssertionError as e:
                raise AssertionError(f"after pass '{name}' (ran {', '.join(done) or 'nothing'} before): {e}") from None
            done.append(name)
            if ins.print_after_all or name in ins.print_after:
                ins.out(f"// ----- IR after {name} -----\n{g.dump()}")
        if ins.time_passes:
            total = sum(t for _, t in ins.timings)
            lines = ["// ----- pass timings -----"]
            for n, t in ins.timings:
                lines.append(f"{t * 1e3:10.3f} ms  {100 * t / total if total else 0:5.1f}%  {n}")
            lines.append(f"{total * 1e3:10.3f} ms  total")
            ins.out("\n".join(lines))
        return g


def _get(name: str) -> Pass:
    if name not in PASSES:
        raise SeqcError(f"unknown pass '{name}'{did_you_mean(name, PASSES)}")
    return PASSES[name]


def run_pipeline(graph, ctx: PlanContext | None = None, pipeline: Pipeline | None = None, instruments=None):
    return (pipeline or Pipeline()).run(graph, ctx, instruments)
