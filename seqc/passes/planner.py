"""The execution planner: for each sequence layer, enumerate its legal plans
(FFT convolution, chunked/parallel scan, plain recurrence), predict each one's
cost from a simple machine model, and pick the cheapest unless the spec or
``compile(mode=...)`` forces one.

Cost model (per forward pass; backward roughly doubles every plan alike):
``time = flops / peak_flops + bytes / bandwidth + sequential_steps * step_overhead``.
A "sequential step" is a dependent round of work the backend cannot batch
(one interpreted loop iteration); it is what makes a recurrence lose at long
lengths on hardware that is fast at big batched ops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import SeqcError
from .manager import compiler_pass

# Machine models: sustained GFLOP/s, GB/s, and seconds per sequential step.
MACHINES = {
    ("torch", "cpu"): dict(flops=25e9, bandwidth=8e9, step=12e-6),
    ("numpy", "cpu"): dict(flops=5e9, bandwidth=4e9, step=25e-6),
    ("triton", "cpu"): dict(flops=1e9, bandwidth=1e9, step=1e-3),
    ("torch", "cuda"): dict(flops=20e12, bandwidth=1.5e12, step=8e-6),
    ("triton", "cuda"): dict(flops=30e12, bandwidth=2e12, step=4e-6),
}
SCAN_CHUNK = 64


@dataclass
class Option:
    plan: str
    flops: float
    bytes: float
    steps: float
    memory: float          # peak extra bytes
    legal: bool = True
    why: str = ""

    def seconds(self, m) -> float:
        return self.flops / m["flops"] + self.bytes / m["bandwidth"] + self.steps * m["step"]


def _itemsize(ctx) -> int:
    return {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}.get(ctx.dtype, 4)


def options_for(node, ctx) -> list[Option]:
    B, L, s = ctx.batch, ctx.length, _itemsize(ctx)
    if node.op == "ssm":
        H = int(node.input_shapes[0][-1])
        kind, N = node.attrs["kind"], node.attrs["d_state"]
        modes = {"diag": N // 2, "s5": N // 2, "dense": N, "shift": N}[kind]
        cplx = 4 if kind in ("diag", "s5") else 1
        mimo = H if kind == "s5" else 1                     # s5 mixes all channels
        nfft = 1 << max(1, math.ceil(math.log2(2 * L)))
        dense_cost = N if kind == "dense" else 1            # dense: N x N mat-vec per step
        kernel = H * mimo * modes * L * 2 * cplx            # Vandermonde kernel, once per call
        fft = B * H * mimo * 5 * nfft * math.log2(nfft) * 2 + B * H * 5 * nfft * math.log2(nfft)
        vandermonde = s * H * mimo * modes * cplx * L                 # (H, modes, L) powers, materialised
        conv = Option("conv", kernel + fft, vandermonde + s * (B * H * L * 3 + B * H * mimo * nfft * 2),
                      steps=6, memory=s * B * H * mimo * nfft * 2)
        per_step = B * H * modes * dense_cost * 2 * cplx * (mimo if kind == "s5" else 1)
        chunks = math.ceil(L / SCAN_CHUNK)
        scan = Option("scan", per_step * L * 2, s * B * H * modes * cplx * L * 2,
                      steps=chunks * 4, memory=s * B * H * modes * cplx * SCAN_CHUNK * 2)
        rec = Option("recurrent", per_step * L, s * B * H * modes * cplx * L, steps=L * 3,
                     memory=s * B * H * modes * cplx)
        return [conv, scan, rec]
    if node.op == "selective_ssm":
        D, N = int(node.input_shapes[0][-1]), node.attrs["d_state"]
        work = B * L * D * N * 6
        conv = Option("conv", 0, 0, 0, 0, legal=False, why="input-dependent (selective) dynamics have no kernel")
        scan = Option("scan", work, s * B * L * (3 * D + 2 * N), steps=math.ceil(L / SCAN_CHUNK),
                      memory=s * B * D * N * math.ceil(L / SCAN_CHUNK))
        rec = Option("recurrent", work, s * B * L * (3 * D + 2 * N), steps=L * 6, memory=s * B * D * N)
        return [conv, scan, rec]
    if node.op in ("lstm", "attention"):
        return [Option("recurrent" if node.op == "lstm" else "scan", 0, 0, 0, 0)]
    return []


def choose(node, ctx):
    """(options, winner, reason) for one node."""
    opts = options_for(node, ctx)
    if not opts:
        return [], None, ""
    m = MACHINES.get((ctx.backend, ctx.device), MACHINES[("torch", "cpu")])
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
    """Choose an execution plan for every sequence layer from the cost model."""
    for n in g.order():
        if n.op in ("ssm", "selective_ssm", "lstm", "attention"):
            _, best, reason = choose(n, ctx)
            n.meta["plan"] = best.plan
            n.meta["plan_reason"] = reason
    return g


def explain(g, ctx) -> str:
    """A table per layer: options, predicted cost, winner."""
    m = MACHINES.get((ctx.backend, ctx.device), MACHINES[("torch", "cpu")])
    lines = [f"plans for batch={ctx.batch} length={ctx.length} backend={ctx.backend} device={ctx.device} "
             f"dtype={ctx.dtype} {'training' if ctx.training else 'inference'}",
             f"machine model: {m['flops'] / 1e9:g} GFLOP/s, {m['bandwidth'] / 1e9:g} GB/s, "
             f"{m['step'] * 1e6:g} us per sequential step"]
    for n in g.order():
        opts, best, reason = choose(n, ctx)
        if not opts:
            continue
        lines.append("")
        lines.append(f"{n.name or '%' + str(n.id)}: {n.op} [{', '.join(f'{k}={v}' for k, v in sorted(n.attrs.items()) if k in ('kind', 'd_state', 'heads', 'hidden', 'disc'))}]")
        lines.append(f"  {'plan':<10} {'GFLOP':>10} {'MB moved':>10} {'seq.steps':>10} {'memory MB':>10} {'predicted':>12}")
        for o in opts:
            if not o.legal:
                lines.append(f"  {o.plan:<10} {'-':>10} {'-':>10} {'-':>10} {'-':>10} {'illegal':>12}  ({o.why})")
                continue
            mark = "  <- chosen" if o is best else ""
            lines.append(f"  {o.plan:<10} {o.flops / 1e9:>10.4f} {o.bytes / 1e6:>10.2f} {o.steps:>10.0f} "
                         f"{o.memory / 1e6:>10.2f} {_fmt_time(o.seconds(m)):>12}{mark}")
        lines.append(f"  winner: {best.plan} ({reason})")
    return "\n".join(lines) + "\n"


def _fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"
