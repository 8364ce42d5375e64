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

from dataclasses import replace

from ..errors import SeqcError
# each op's plan options live with its spec (OpSpec.plan_options); the cost-model names stay importable here
from ..ops.base import TRAIN_BATCHED_STEPS, TRAIN_LOOP_STEPS  # noqa: F401
from ..ops.base import PlanOption as Option
from ..ops.selective_ssm import SCAN_CHUNK  # noqa: F401
from ..ops.ssm import CONV_OPS  # noqa: F401
from ..lower import PlanTable
from .manager import compiler_pass


def _machine(ctx):
    """The machine model the backend gives for the context's device and dtype."""
    if ctx.machine is not None:
        return ctx.machine
    from ..backend import get_backend
    return get_backend(ctx.backend, check=False).machine(ctx.device, ctx.dtype)


def options_for(node, ctx) -> list[Option]:
    """The node's execution plans with their predicted costs (its op's ``plan_options``)."""
    spec = node.spec
    if spec is None or spec.plan_options is None:
        return []
    return spec.plan_options(node, ctx, _machine(ctx))


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
    if forced != "auto":            # compile(mode=...) names a plan this layer cannot run
        why = next((o.why for o in opts if o.plan == forced), "") or f"{node.op} has no {forced} plan"
        return opts, best, f"mode={forced} is not available ({why}); {'only legal plan' if len(legal) == 1 else 'cheapest'}"
    if len(opts) == 1:
        return opts, best, f"the only plan {node.op} has"
    if len(legal) == 1:
        return opts, best, "only legal plan"
    cost = best.seconds(m)
    ties = [o.plan for o in legal if o is not best and o.seconds(m) <= cost * (1 + 1e-9)]
    others = sorted((o for o in legal if o is not best and o.plan not in ties), key=lambda o: o.seconds(m))
    tied = f" (as cheap: {', '.join(ties)})" if ties else ""
    if not others:
        return opts, best, f"cheapest{tied}"
    ratio = others[0].seconds(m) / max(cost, 1e-15)
    return opts, best, f"cheapest: {ratio:.1f}x faster than {others[0].plan}{tied}"


@compiler_pass("plan")
def plan(g, ctx):
    """Choose an execution plan for every sequence layer from the cost model.

    With ``ctx.length`` None (shapes unknown until run time), a layer whose
    best plan depends on the length keeps ``plan=auto`` and carries a threshold
    table (``meta["plan_table"]``, see ``plan_table``) from which the backend
    picks the plan on each call without the planner."""
    decided: dict = {}       # a repeated layer (same op, attributes, input shapes) is decided once
    for n in g.order():
        if n.spec is None or n.spec.plan_options is None:
            continue
        _warn_unavailable_mode(n, ctx)
        key = _decision_key(n)
        if key is not None and key in decided:
            n.meta.update(decided[key])
            continue
        _decide(n, ctx)
        if key is not None:
            decided[key] = {k: n.meta[k] for k in ("plan", "plan_reason", "plan_table") if k in n.meta}
    return g


def _decision_key(n):
    """What the cost model reads of a node (its op, attributes and input shapes), hashable;
    None when an attribute value is not."""
    try:
        key = (n.op, tuple(sorted(n.attrs.items())), tuple(tuple(s) for s in n.input_shapes))
        hash(key)
    except TypeError:
        return None
    return key


def _decide(n, ctx) -> None:
    """The plan of one node (``meta["plan"]``, ``plan_reason``, ``plan_table`` for per-call plans)."""
    if ctx.length is None:
        guesses = {choose(n, replace(ctx, length=L, batch=b, training=t))[1].plan
                   for L in (16, 1024, 65536) for b in (1, 64) for t in (False, True)}
        if len(guesses) > 1:
            n.meta["plan"], n.meta["plan_reason"] = "auto", "chosen per call from the input's shape"
            n.meta["plan_table"] = plan_table(n, ctx)
            return
        ctx_n = replace(ctx, length=1024)
    else:
        ctx_n = ctx
    _, best, reason = choose(n, ctx_n)
    n.meta["plan"] = best.plan
    n.meta["plan_reason"] = reason


def _warn_unavailable_mode(n, ctx) -> None:
    """``mode=conv`` (or any forced mode) on a layer that has other plans but not that one
    is a located warning naming the layer and the plan it runs instead, never a silent
    fallback.  Layers with a single plan (LSTM, attention) are not warned about."""
    if ctx.mode == "auto" or n.attrs.get("plan", "auto") != "auto":
        return
    opts = options_for(n, replace(ctx, length=ctx.length or 1024))
    if len(opts) < 2 or any(o.plan == ctx.mode and o.legal for o in opts):
        return
    import warnings

    from ..errors import SeqcWarning
    why = next((o.why for o in opts if o.plan == ctx.mode), "") or f"{n.op} has no {ctx.mode} plan"
    others = "/".join(o.plan for o in opts if o.legal)
    warnings.warn(SeqcWarning(f"mode={ctx.mode} cannot apply to {n.op} layer '{n.name or '%' + str(n.id)}' ({why}); "
                              f"it runs its cheapest plan of {others} instead", n.span), stacklevel=3)


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
    """A table per layer with a choice of plans (options, predicted cost, winner), and
    one line per single-plan layer (LSTM, GRU, attention): its plan and why."""
    m = _machine(ctx)
    lines = [f"plans for batch={ctx.batch} length={ctx.length} backend={ctx.backend} device={ctx.device} "
             f"dtype={ctx.dtype} {'training' if ctx.training else 'inference'}",
             f"machine model: {m['step'] * 1e6:g} us per sequential step; ns per element "
             + ", ".join(f"{k} {v:g}" for k, v in m["ns"].items()) + f"; last-level cache {m['llc'] >> 20} MiB"]
    for n in g.order():
        opts, best, reason = choose(n, ctx)
        if not opts:
            continue
        attrs = ", ".join(f"{k}={v}" for k, v in sorted(n.attrs.items())
                          if k in ("kind", "d_state", "disc", "hidden", "layers", "heads"))
        if len(opts) == 1:          # LSTM, GRU, attention: one plan, nothing to weigh
            lines += ["", f"{n.name or '%' + str(n.id)}: {n.op} [{attrs}]",
                      f"  plan: {best.plan} ({reason}: one kernel over the whole sequence, nothing to weigh; "
                      f"step() is its token-by-token face)"]
            continue
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
