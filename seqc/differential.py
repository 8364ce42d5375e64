"""Differential testing: run one spec through several backends (and plans) on
the same seeded weights and inputs, compare every node's result, and localise
the first node where they diverge.  Gradients are compared between autograd
backends."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .compiler import BACKENDS, check_choice, plan_graph
from .errors import SeqcError
from .init import init_weights
from .inputs import as_list, random_inputs


@dataclass
class Row:
    node: int
    name: str
    op: str
    where: str
    max_abs: float
    max_rel: float
    ok: bool


@dataclass
class Report:
    backends: tuple[str, ...]
    rows: list[Row] = field(default_factory=list)
    output_abs: float = 0.0
    grad_abs: float | None = None
    tolerance: float = 1e-8
    ok: bool = True

    @property
    def first_divergence(self) -> Row | None:
        return next((r for r in self.rows if not r.ok), None)

    def __str__(self) -> str:
        a, b = self.backends
        lines = [f"difftest {a} vs {b}: {'OK' if self.ok else 'MISMATCH'} "
                 f"(output max |diff| {self.output_abs:.3g}, tolerance {self.tolerance:g})"]
        if self.grad_abs is not None:
            lines.append(f"gradients max |diff| {self.grad_abs:.3g}")
        lines.append(f"  {'node':>5} {'op':<14} {'max abs':>10} {'max rel':>10}  name / location")
        for r in self.rows:
            flag = "" if r.ok else "   <-- first divergence" if r is self.first_divergence else "   (diverged)"
            lines.append(f"  %{r.node:<4} {r.op:<14} {r.max_abs:>10.3g} {r.max_rel:>10.3g}  {r.name or '-'} "
                         f"{r.where}{flag}")
        return "\n".join(lines)


def _run(backend, graph, weights, xs, mode):
    """(output, {node: [arrays]}, grads or None) in float64."""
    if backend == "numpy":
        from .backends.numpy.codegen import NumpyModel
        m = NumpyModel(graph)
        out, values = m.trace(*xs, weights=weights)
        return [np.asarray(o) for o in as_list(out)], {k: _as_list(v) for k, v in values.items()}, None
    import torch
    from .backends.torch.module import build_module
    model = build_module(graph).double().load_numpy(weights).eval()   # dropout off, like the oracle
    ts = [torch.as_tensor(x) if x.dtype.kind == "i" else torch.as_tensor(x, dtype=torch.float64) for x in xs]
    out, values = model.trace(*ts)
    rng = np.random.default_rng(7)
    loss = sum((o * torch.as_tensor(rng.standard_normal(tuple(o.shape)))).sum() for o in as_list(out))
    if loss.requires_grad:          # a model without weights has nothing to differentiate
        loss.backward()
    grads = {k: p.grad.detach().numpy().copy() for k, p in model.named_parameters() if p.grad is not None}
    return ([o.detach().numpy() for o in as_list(out)],
            {k: [t.detach().numpy() for t in _as_list(v)] for k, v in values.items()}, grads)


def _as_list(v):
    return list(v) if isinstance(v, tuple) else [v]


def difftest(spec, backends=("numpy", "torch"), params=None, seed: int = 0, *, batch: int = 2, length: int = 16,
             modes=("auto", "auto"), tolerance: float = 1e-8) -> Report:
    """Compare two backends node by node, in float64."""
    if len(backends) != 2:
        raise SeqcError(f"difftest compares two backends, got {len(backends)}")
    if len(modes) != len(backends):
        raise SeqcError(f"difftest needs one mode per backend ({len(backends)}), got {len(modes)}")
    for b in backends:
        check_choice("backend", b, BACKENDS)
    graphs = [plan_graph(spec, b, params, m, length=length, batch=batch) for b, m in zip(backends, modes)]
    weights = init_weights(graphs[0], seed=seed)
    xs = random_inputs(graphs[0], batch, length, np.random.default_rng(seed + 1))
    results = [_run(b, g, weights, xs, m) for b, g, m in zip(backends, graphs, modes)]
    report = Report(tuple(backends), tolerance=tolerance)
    (out_a, val_a, grad_a), (out_b, val_b, grad_b) = results
    for n in graphs[0].order():
        if n.id not in val_a or n.id not in val_b:
            continue
        errs = [(np.abs(np.asarray(a, float) - np.asarray(b, float)), np.abs(np.asarray(a, float)))
                for a, b in zip(val_a[n.id], val_b[n.id])]
        max_abs = max(float(e.max(initial=0)) for e, _ in errs)
        scale = max(float(m.max(initial=0)) for _, m in errs)
        rel = max_abs / max(scale, 1e-30)
        where = f"{n.span.file}:{n.span.line}:{n.span.column}" if n.span else ""
        report.rows.append(Row(n.id, n.name, n.op, where, max_abs, rel, max_abs <= tolerance * max(1.0, scale)))
    report.output_abs = max(float(np.abs(a - b).max(initial=0)) for a, b in zip(out_a, out_b))
    if grad_a is not None and grad_b is not None:
        report.grad_abs = max((float(np.abs(grad_a[k] - grad_b[k]).max()) for k in grad_a if k in grad_b), default=0)
    scale = max(1.0, max(float(np.abs(a).max(initial=0)) for a in out_a))
    report.ok = all(r.ok for r in report.rows) and report.output_abs <= tolerance * scale
    if report.grad_abs is not None:
        report.ok = report.ok and report.grad_abs <= tolerance * 100
    return report
