"""The execution planner: for each sequence layer, enumerate its legal plans
(FFT convolution, chunked scan, plain recurrence), predict each one's cost
from a machine model, and pick the cheapest unless the spec or
``compile(mode=...)`` forces one.

Cost model (per forward pass; backward scales every plan alike):

    time = sequential_steps * step_overhead + elements * ns_per_element(plan, working set)

* a *sequential step* is one dependent round the backend cannot batch (an
  interpreted loop iteration, a kernel launch);
* *elements* are the state-sized values a plan materialises: the Vandermonde
  powers of the convolution plan, the per-step states of the scans;
* a plan's cost per element is calibrated per machine by
  ``benchmarks/bench_plans.py``; the recurrence's per-element cost rises once
  its state history no longer fits the last-level cache.

FLOPs and bytes are reported alongside for information.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import SeqcError
from ..lower import PlanTable
from .manager import compiler_pass

SCAN_CHUNK = 64
CONV_OPS = 85
# forward+backward / forward, per sequential step (fitted with bench_plans.py --train)
TRAIN_LOOP_STEPS = 6.0
TRAIN_BATCHED_STEPS = 2.5


@dataclass
class Option:
    plan: str
    steps: float
    elements: float
    ns_per_element: float
    flops: float
    working_set: float      # bytes materialised
    legal: bool = True
    why: str = ""
    batched: bool = False      # its steps are a fixed set of batched ops, not a loop over time
    training: bool = False

    def seconds(self, m) -> float:
        steps, elements = self.steps, self.elements
        if self.training:   # backward: autograd replays every step (a loop's far more dearly)
            steps *= TRAIN_BATCHED_STEPS if self.batched else TRAIN_LOOP_STEPS
            elements *= 2
        return steps * m["step"] + elements * self.ns_per_element * 1e-9


def _machine(ctx):
    """The machine model the backend gives for the context's device and dtype."""
    if ctx.machine is not None:
        return ctx.machine
    from ..backend import get_backend
    return get_backend(ctx.backend, check=False).machine(ctx.device, ctx.dtype)


def _itemsize(ctx) -> int:
    return {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}.get(ctx.dtype, 4)


def options_for(node, ctx) -> list[Option]:
    B, L, s = ctx.batch, ctx.length, _itemsize(ctx)
    m = _machine(ctx)
    if node.op == "ssm":
        H = int(node.input_shapes[0][-1])
        kind, N = node.attrs["kind"], node.attrs["d_state"]
        modes = {"diag": N // 2, "s5": N // 2, "dense": N, "shift": N}[kind]
        cplx = 2 if kind in ("diag", "s5") else 1
        per_step = modes * (N if kind == "dense" else 1)        # dense: an N x N mat-vec per step
        width = 1 if kind == "s5" else H                         # s5: one state shared by the channels
        nfft = 1 << max(1, math.ceil(math.log2(2 * L)))
        fft_flops = B * H * 5 * nfft * math.log2(nfft) * 2
        vander = (H * H if kind == "s5" else H) * modes * L      # kernel powers, once per call
        states = B * width * per_step * L
        # conv: ~85 batched ops whatever L (kernel by blocked Vandermonde products, rfft, irfft)
        conv = Option("conv", CONV_OPS, vander + B * H * nfft, m["ns"]["conv"],
                      vander * 8 * cplx + fft_flops, s * cplx * (vander + B * H * nfft), batched=True)
        scan = Option("scan", 3 * math.sqrt(L), states, m["ns"]["scan"], states * 4 * cplx, s * cplx * states * 3)
        history = s * cplx * states * 2
        rec_ns = m["ns"]["recurrent"] if history <= m["llc"] else m["ns"]["recurrent_dram"]
        rec = Option("recurrent", L, states, rec_ns, states * 4 * cplx, history)
        return [conv, scan, rec]
    if node.op == "selective_ssm":
        D, N = int(node.input_shapes[0][-1]), node.attrs["d_state"]
        elems = B * L * D * N
        why = "input-dependent (selective) dynamics have no convolution kernel"
        conv = Option("conv", 0, 0, 0, 0, 0, legal=False, why=why)
        scan = Option("scan", math.ceil(L / SCAN_CHUNK), elems, m["ns"]["selective"], elems * 6,
                      s * B * D * N * math.ceil(L / SCAN_CHUNK), batched=True)
        rec = Option("recurrent", L * 6, elems, m["ns"]["selective"], elems * 6, s * B * D * N * L)
        return [conv, scan, rec]
    if node.op in ("lstm", "attention"):   # one plan each: the fused LSTM kernel, SDPA (the recurrent face is step)
        return [Option("recurrent", 0, 0, 0, 0, 0)]
    return []


def choose(node, ctx):
    """(options, winner, reason) for one node."""
    opts = options_for(node, ctx)
    for o in opts:
        o.training = ctx.training
    if not opts:
        return [], None, ""
    m = _machine(ctx)
    legal = [o for o in opts if o.legal]
    forced = node.attrs.get("plan", "auto")
    source = "spec"
    if forced == "auto" and ctx.mode != "auto":
        forced, source = ctx.mode, "mode"
    if forced != "auto":
        hit = [o for o in legal if o.plan == forced]
        if hit:
            return opts, hit[0], f"forced by {source} (plan={forced})"
        if source == "spec":
            why = next((o.why for o in opts if o.plan == forced), "")
            raise SeqcError(f"plan={forced} is not available for {node.op}" + (f": {why}" if why else ""),
                            node.span)
    best = min(legal, key=lambda o: o.seconds(m))
    if len(legal) == 1:
        return opts, best, "only legal plan"
    runner = sorted(legal, key=lambda o: o.seconds(m))[1]
    ratio = runner.seconds(m) / max(best.seconds(m), 1e-15)
    return opts, best, f"cheapest: {ratio:.1f}x faster than {runner.plan}"


@compiler_pass("plan")
def plan(g, ctx):
    """Choose an execution plan for every sequence layer from the cost model.

    With ``ctx.length`` None (shapes unknown until run time), a layer whose
    best plan depends on the length keeps ``plan=auto`` and carries a threshold
    table (``meta["plan_table"]``, see ``plan_table``) from which the backend
    picks the plan on each call without the planner."""
    for n in g.order():
        if n.op not in ("ssm", "selective_ssm", "lstm", "attention"):
            continue
        if ctx.length is None:
            guesses = {choose(n, replace(ctx, length=L))[1].plan for L in (16, 1024, 65536)}
            if len(guesses) > 1:
                n.meta["plan"], n.meta["plan_reason"] = "auto", "chosen per call from the input's shape"
                n.meta["plan_table"] = plan_table(n, ctx)
                continue
            ctx_n = replace(ctx, length=1024)
        else:
            ctx_n = ctx
        _, best, reason = choose(n, ctx_n)
        n.meta["plan"] = best.plan
        n.meta["plan_reason"] = reason
    return g


def plan_for_shapes(node, ctx, batch: int, length: int, training: bool) -> str:
    """The plan the cost model picks for one call's shapes."""
    return choose(node, replace(ctx, batch=batch, length=length, training=training))[1].plan


TABLE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TABLE_MAX_LENGTH = 1 << 20


def plan_table(node, ctx) -> PlanTable:
    """The cost model's plan for every (training, batch in TABLE_BATCHES, length),
    as sorted length breakpoints.  Lengths are sampled at each power of two and
    the length after it (the convolution's FFT size jumps there), up to
    TABLE_MAX_LENGTH; each change of winner between samples is located exactly by
    bisection, so the table agrees with ``plan_for_shapes`` at every length of
    those batches as long as the winner changes at most once between samples."""
    samples = sorted({1} | {v for k in range(1, TABLE_MAX_LENGTH.bit_length()) for v in (1 << k, (1 << k) + 1)})
    rows = {}
    for training in (False, True):
        for batch in TABLE_BATCHES:
            def best(length, batch=batch, training=training):
                return plan_for_shapes(node, ctx, batch, length, training)
            row = [(1, best(1))]
            lo = 1
            for hi in samples[1:]:
                while best(hi) != row[-1][1]:
                    a, b = lo, hi           # best(a) == current plan, best(b) differs
                    while b - a > 1:
                        mid = (a + b) // 2
                        if best(mid) == row[-1][1]:
                            a = mid
                        else:
                            b = mid
                    row.append((b, best(b)))
                    lo = b
                lo = hi
            rows[(training, batch)] = tuple(row)
    return PlanTable(TABLE_BATCHES, rows)


def explain(g, ctx) -> str:
    """A table per layer: options, predicted cost, winner."""
    m = _machine(ctx)
    lines = [f"plans for batch={ctx.batch} length={ctx.length} backend={ctx.backend} device={ctx.device} "
             f"dtype={ctx.dtype} {'training' if ctx.training else 'inference'}",
             f"machine model: {m['step'] * 1e6:g} us per sequential step; ns per element "
             + ", ".join(f"{k} {v:g}" for k, v in m["ns"].items()) + f"; last-level cache {m['llc'] >> 20} MiB"]
    for n in g.order():
        opts, best, reason = choose(n, ctx)
        if not opts or len(opts) == 1:
            continue
        attrs = ", ".join(f"{k}={v}" for k, v in sorted(n.attrs.items()) if k in ("kind", "d_state", "disc"))
        lines += ["", f"{n.name or '%' + str(n.id)}: {n.op} [{attrs}]",
                  f"  {'plan':<10} {'seq.steps':>10} {'elements':>12} {'ns/elem':>8} {'GFLOP':>9} "
                  f"{'memory MB':>10} {'predicted':>11}"]
        for o in opts:
            if not o.legal:
                lines.append(f"  {o.plan:<10} {'illegal: ' + o.why}")
                continue
            mark = "  <- chosen" if o is best else ""
            lines.append(f"  {o.plan:<10} {o.steps:>10.0f} {o.elements:>12.3g} {o.ns_per_element:>8.2f} "
                         f"{o.flops / 1e9:>9.4f} {o.working_set / 2 ** 20:>10.2f} {_fmt_time(o.seconds(m)):>11}{mark}")
        lines.append(f"  winner: {best.plan} ({reason})")
    return "\n".join(lines) + "\n"


def _fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"
