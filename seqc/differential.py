"""Differential testing: run one spec through two backends (or two plans of one
backend) on the same seeded weights and inputs, and compare

* every node's forward value, localising the first node where they diverge;
* the gradients of the loss ``sum(w * outputs)`` (random ``w``) with respect to
  every parameter and every float input: tensor against tensor between two
  autograd backends; against the float64 NumPy oracle by a central directional
  derivative ``(f(t + eps v) - f(t - eps v)) / 2 eps`` against ``<grad, v>`` for a
  random direction ``v`` per tensor (two oracle runs per tensor);
* recurrent stepping (``init_state`` + ``step`` over the sequence) against the
  forward pass, on each side.

Tolerances follow the element type and are printed with the report.  Inputs and
weights are first rounded to that type, so both sides compute on the same
numbers.  ``inject_fault`` (for tests of difftest itself) perturbs one side at
one node: a sign flip of its value, an off-by-one causal mask in attention, or
the wrong discretization method of an SSM.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from .backend import get_backend
from .compiler import MODES, check_choice, check_supported, plan_graph
from .errors import SeqcError
from .init import init_weights
from .inputs import as_list, random_inputs
from .lower import lower

DTYPES = ("float64", "float32", "bfloat16")
# Relative tolerances per element type, about 10-20x the largest error measured over every example
# (n_layers=1, length 12-16, numpy vs torch and torch plan vs plan):
#   value: max|a - b| <= value * max(|a|, |b|), per node and for step-vs-forward
#          (measured: float64 1.6e-15, float32 4.6e-7, bfloat16 9.6e-3)
#   grad:  the same, for gradient tensors between two autograd backends
#          (measured: float64 6.4e-16, float32 3.3e-7 between torch plans, 1.3e-5 for torch vs the
#          Triton kernels on s4d's log_A_real - a scan against the FFT convolution - so 5e-5 there)
#   fd:    |fd - <g, v>| <= fd * ||g * v|| for the oracle's central directional derivative, whose own
#          truncation error dominates in float64 (measured: float64 2.1e-6, float32 4.3e-6, bfloat16 1.5e-2)
TOLERANCES = {
    "float64": {"value": 1e-10, "grad": 1e-10, "fd": 2e-5},
    "float32": {"value": 1e-5, "grad": 5e-5, "fd": 5e-5},
    "bfloat16": {"value": 2e-2, "grad": 5e-2, "fd": 5e-2},
}
FD_FLOOR = 1e-6      # directional errors are relative to at least this share of the largest |g * v|
# ... and to at least this absolute size: where every gradient is (analytically) zero - a zeros-initialised
# linear feeding x * silu(x), whose derivative vanishes at 0 - the central difference's own truncation
# error, O(eps^2) with eps ~ 1e-5, is all that is left to compare (measured 1e-11 on such a model)
FD_ABS_FLOOR = 1e-8
# the central difference's rounding error, this many ulps of the loss over the step, is not held against
# the gradient (a small-RMS weight such as a dt_rank = 1 dt_proj in a Mamba stack: 4.5e-5 relative
# error at FD_EPS, 2e-6 at a 10x larger step - cancellation, not a wrong gradient)
FD_ROUNDING_ULPS = 16
FD_EPS = 1e-5          # central-difference step, relative to the tensor's RMS (1e-4 and 1e-6 measured worse)


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
class GradRow:
    """One tensor's gradient check: a parameter (``name`` is its state_dict key) or an input."""
    name: str
    layer: str
    where: str
    error: float          # relative error (see TOLERANCES)
    method: str           # "tensor" or "directional"
    ok: bool


@dataclass
class StepRow:
    backend: str
    error: float
    ok: bool
    note: str = ""


@dataclass
class Report:
    backends: tuple[str, ...]
    rows: list[Row] = field(default_factory=list)
    grads: list[GradRow] = field(default_factory=list)
    steps: list[StepRow] = field(default_factory=list)
    output_abs: float = 0.0
    grad_abs: float | None = None
    tolerance: float = 1e-8
    tolerances: dict = field(default_factory=dict)
    dtype: str = "float64"
    modes: tuple[str, ...] = ()
    ok: bool = True

    @property
    def first_divergence(self) -> Row | None:
        return next((r for r in self.rows if not r.ok), None)

    @property
    def worst_gradient(self) -> GradRow | None:
        return max(self.grads, key=lambda g: g.error / max(self._gtol(g), 1e-300), default=None)

    def _gtol(self, g: GradRow) -> float:
        return self.tolerances["grad" if g.method == "tensor" else "fd"]

    def __str__(self) -> str:
        a, b = (name if mode == "auto" else f"{name}[{mode}]"
                for name, mode in zip(self.backends, self.modes or ("auto", "auto")))
        t = self.tolerances
        lines = [f"difftest {a} vs {b}: {'OK' if self.ok else 'MISMATCH'} "
                 f"({self.dtype}, output max |diff| {self.output_abs:.3g})",
                 f"tolerances (relative): values {t['value']:g}, gradients {t['grad']:g}, "
                 f"directional derivatives {t['fd']:g}"]
        lines.append(f"  {'node':>5} {'op':<14} {'max abs':>10} {'max rel':>10}  name / location")
        first = self.first_divergence
        for r in self.rows:
            flag = "" if r.ok else "   <-- first divergence" if r is first else "   (diverged)"
            lines.append(f"  %{r.node:<4} {r.op:<14} {r.max_abs:>10.3g} {r.max_rel:>10.3g}  {r.name or '-'} "
                         f"{r.where}{flag}")
        if self.grads:
            worst = self.worst_gradient
            lines.append(f"gradients of {len(self.grads)} tensor(s) ({self.grads[0].method}): "
                         f"worst {worst.name} (layer {worst.layer or '-'} {worst.where}) relative error "
                         f"{worst.error:.3g} {'OK' if worst.ok else 'MISMATCH'}")
            for g in self.grads:
                if not g.ok:
                    lines.append(f"  gradient mismatch: {g.name} (layer {g.layer or '-'} {g.where}) "
                                 f"relative error {g.error:.3g}")
        else:
            lines.append("gradients: not compared (no autograd backend, or nothing to differentiate)")
        for s in self.steps:
            lines.append(f"step vs forward on {s.backend}: " + (s.note if s.note else
                         f"max rel {s.error:.3g} {'OK' if s.ok else 'MISMATCH'}"))
        return "\n".join(lines)


# -- fault injection (for testing difftest itself) ----------------------------------------------

FAULT_KINDS = ("sign", "causal", "discretization")
_FAULTS: list[dict] = []
_WRONG_METHOD = {"zoh": "euler", "euler": "zoh", "bilinear": "euler", "backward_euler": "zoh", "mamba": "zoh"}


@contextlib.contextmanager
def inject_fault(node, kind: str = "sign", backend: str | None = None):
    """Within the block, difftest perturbs one side's value at the matching node.

    ``node``: a node id, a layer name, an op name (its first node), or a source
    location ``FILE:LINE:COL`` (or its ``LINE:COL`` tail).  ``kind``: ``sign``
    (negate the node's value), ``causal`` (attention lets each position see one
    future key; torch backend), ``discretization`` (the SSM node uses the wrong
    discretization method).  ``backend``: the side to perturb (default the second)."""
    check_choice("fault kind", kind, FAULT_KINDS)
    fault = {"node": node, "kind": kind, "backend": backend}
    _FAULTS.append(fault)
    try:
        yield fault
    finally:
        _FAULTS.remove(fault)


def _match(program, node):
    for c in program.calls:
        if node == c.node or node in (c.name, c.op) or (isinstance(node, str) and c.where and
                                                         (c.where == node or c.where.endswith(":" + node))):
            return c
    raise SeqcError(f"inject_fault: no node matches {node!r}")


def _faults_for(side: int, backend: str, n_sides: int) -> list[dict]:
    return [f for f in _FAULTS if (f["backend"] == backend if f["backend"] else side == n_sides - 1)]


def _apply_program_faults(program, faults) -> None:
    for f in faults:
        if f["kind"] != "discretization":
            continue
        c = _match(program, f["node"])
        if "disc" not in c.attrs:
            raise SeqcError(f"inject_fault: {c.op} at {c.where} has no discretization")
        choices = getattr(c.spec.attr("disc"), "choices", ()) or tuple(_WRONG_METHOD)
        wrong = _WRONG_METHOD.get(c.attrs["disc"])
        wrong = wrong if wrong in choices else next(m for m in choices if m != c.attrs["disc"])
        c.attrs = dict(c.attrs, disc=wrong)
        c.meta = {k: v for k, v in c.meta.items() if k != "disc"}   # the derived program follows the method
        region = c.meta.get("region")
        if region is not None and "disc" in region.flags:            # so do the kernel's specialisation flags
            c.meta["region"] = dataclasses.replace(region, flags={**region.flags, "disc": wrong})


def _hook(program, faults):
    signs = {_match(program, f["node"]).node for f in faults if f["kind"] == "sign"}
    if not signs:
        return None

    def hook(node, value):
        if node not in signs:
            return value
        return tuple(-v for v in value) if isinstance(value, tuple) else -value
    return hook


@contextlib.contextmanager
def _model_faults(backend: str, model, program, faults):
    """Faults that live in a built model for the time of its runs (the causal mask)."""
    causal = [_match(program, f["node"]) for f in faults if f["kind"] == "causal"]
    if not causal:
        yield
        return
    if not hasattr(model, "get_submodule"):
        raise SeqcError(f"inject_fault(kind='causal') perturbs torch attention modules, not the {backend} backend")
    import torch
    import torch.nn.functional as F
    sdpa = F.scaled_dot_product_attention

    def leaky(q, k, v, attn_mask=None, is_causal=False, **kw):
        if is_causal:       # off by one: each query also sees the next key
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril(1)
            return sdpa(q, k, v, attn_mask=mask, **kw)
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    handles = []
    for c in causal:
        mod = model.get_submodule(c.name)
        handles.append(mod.register_forward_pre_hook(lambda *a: setattr(F, "scaled_dot_product_attention", leaky)))
        handles.append(mod.register_forward_hook(lambda *a: setattr(F, "scaled_dot_product_attention", sdpa)))
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()


# -- running one side ----------------------------------------------------------------------------

class Side:
    """One backend + plan mode: its program, model and runs."""

    def __init__(self, index, backend, mode, spec, params, dtype, length, batch, n_sides):
        self.name, self.mode = backend, mode
        self.be = get_backend(backend)
        self.dtype = dtype if self.be.autograd else None
        graph = plan_graph(spec, backend, params, mode, length=length, batch=batch, dtype=self.dtype)
        self.graph = graph
        self.program = lower(graph)
        check_supported(self.be, self.program)
        self.faults = _faults_for(index, backend, n_sides)
        _apply_program_faults(self.program, self.faults)

    def build(self, weights):
        self.model = self.be.build(self.program, weights, dtype=self.dtype)
        if hasattr(self.model, "eval"):
            self.model.eval()              # dropout off, as in the oracle
        self.hook = _hook(self.program, self.faults)
        return self

    def trace(self, xs):
        """(outputs, {node: [float64 arrays]}) without gradients."""
        with _model_faults(self.name, self.model, self.program, self.faults), self.be.inference():
            outs, values = self.be.trace(self.model, self.be.inputs(self.model, xs), hook=self.hook)
        return [_np(o) for o in outs], {k: [_np(v) for v in vs] for k, vs in values.items()}

    def gradients(self, xs, cotangents) -> dict:
        """{state_dict key or 'input NAME': gradient} of sum(w * outputs) (autograd backends)."""
        import torch
        model = self.model
        ts = self.be.inputs(model, xs)
        for t in ts:
            if t.is_floating_point():
                t.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        with _model_faults(self.name, model, self.program, self.faults):
            outs, _ = self.be.trace(model, ts, hook=self.hook)
        loss = sum((o.to(torch.float64) * torch.as_tensor(w, device=o.device)).sum() for o, w in zip(outs, cotangents))
        if not loss.requires_grad:
            return {}
        loss.backward()
        grads = {k: _np(p.grad) for k, p in model.named_parameters() if p.grad is not None}
        for name, t in zip(_input_names(self.graph), ts):
            if t.grad is not None:
                grads[f"input {name}"] = _np(t.grad)
        return grads

    def loss(self, xs, weights, cotangents) -> float:
        """sum(w * outputs) from the oracle, with the given inputs and weights."""
        self.model.weights = weights
        outs = self.be.forward(self.model, xs)
        return float(sum((o * w).sum() for o, w in zip(outs, cotangents)))

    def stepped(self, xs, batch, length):
        """The outputs of init_state + step over the sequence, (batch, length, ...) each."""
        model = self.model
        with _model_faults(self.name, model, self.program, self.faults), self.be.inference():
            native = self.be.inputs(model, xs)
            state = model.init_state(batch)
            ys = []
            for t in range(length):
                y, state = model.step(*[x[:, t] for x in native], state=state)
                ys.append([_np(v) for v in as_list(y)])
        return [np.stack([y[k] for y in ys], 1) for k in range(len(ys[0]))]


def _np(v) -> np.ndarray:
    if hasattr(v, "detach"):
        import torch
        v = v.detach().to("cpu")
        return (v.to(torch.float64) if v.is_floating_point() else v).numpy()
    return np.asarray(v, dtype=np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v)


def _input_names(graph) -> list[str]:
    return [graph.nodes[i].attrs["name"] for i in graph.inputs]


def _round(a: np.ndarray, dtype: str) -> np.ndarray:
    """`a` rounded to `dtype` and back to float64 (integers untouched)."""
    if a.dtype.kind != "f" or dtype == "float64":
        return a
    if dtype == "float32":
        return a.astype(np.float32).astype(np.float64)
    import torch
    return torch.as_tensor(a).to(getattr(torch, dtype)).to(torch.float64).numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        return math.inf, math.inf
    diff = float(np.abs(a - b).max(initial=0))
    if not np.isfinite(a).all() or not np.isfinite(b).all():
        return (0.0, 0.0) if np.array_equal(a, b, equal_nan=True) else (math.inf, math.inf)
    return diff, diff / max(float(np.abs(a).max(initial=0)), float(np.abs(b).max(initial=0)), 1e-30)


def _layer_of(program, key: str) -> tuple[str, str]:
    """(layer name, FILE:LINE:COL) of a parameter key or an 'input NAME'."""
    if key.startswith("input "):
        name = key[6:]
        for i in program.graph.inputs:
            n = program.graph.nodes[i]
            if n.attrs["name"] == name:
                s = n.span
                return "", f"{s.file}:{s.line}:{s.column}" if s else ""
        return "", ""
    best = None
    for c in program.layers():
        if c.has_weights and (c.name == "" or key.startswith(c.name + ".")):
            if best is None or len(c.name) > len(best.name):
                best = c
    return (best.name, best.where) if best else ("", "")


def _check_tolerance(tolerance):
    if tolerance is None:
        return None
    try:
        t = float(tolerance)
    except (TypeError, ValueError):
        raise SeqcError(f"tolerance must be a positive number, got {tolerance!r}") from None
    if not math.isfinite(t) or t <= 0:
        raise SeqcError(f"tolerance must be a positive finite number, got {tolerance!r}")
    return t


def difftest(spec, backends=("numpy", "torch"), params=None, seed: int = 0, dtype: str = "float64", *,
             modes=None, length: int = 16, batch: int = 2, tolerance: float | None = None, grads: bool = True,
             step: bool = True) -> Report:
    """Compare two backends (or two plans) node by node, gradients and stepping.
    ``modes`` gives each side's plan mode (auto |
    conv | scan | recurrent); ``tolerance`` overrides the value tolerance of
    ``dtype``."""
    backends = tuple(backends)
    if len(backends) != 2:
        raise SeqcError(f"difftest compares two backends, got {len(backends)}")
    modes = ("auto",) * len(backends) if modes is None else tuple(modes)
    if len(modes) != len(backends):
        raise SeqcError(f"difftest needs one mode per backend ({len(backends)}), got {len(modes)}")
    for m in modes:
        check_choice("mode", m, MODES)
    check_choice("dtype", dtype, DTYPES)
    for name, v in (("length", length), ("batch", batch)):
        if not isinstance(v, int) or v < 1:
            raise SeqcError(f"{name} must be a positive integer, got {v!r}")
    tol = dict(TOLERANCES[dtype])
    if (t := _check_tolerance(tolerance)) is not None:
        tol["value"] = t
    sides = [Side(i, b, m, spec, params, dtype, length, batch, len(backends))
             for i, (b, m) in enumerate(zip(backends, modes))]
    graph = sides[0].graph
    weights = {k: _round(v, dtype) for k, v in init_weights(graph, seed=seed).items()}
    xs = [_round(x, dtype) for x in random_inputs(graph, batch, length, np.random.default_rng(seed + 1))]
    for s in sides:
        s.build(weights)
    report = Report(backends, tolerance=tol["value"], tolerances=tol, dtype=dtype, modes=modes)

    (out_a, val_a), (out_b, val_b) = (s.trace(xs) for s in sides)
    for n in graph.order():
        if n.id not in val_a or n.id not in val_b:
            continue
        pairs = [_rel(a, b) for a, b in zip(val_a[n.id], val_b[n.id])]
        max_abs, rel = max(p[0] for p in pairs), max(p[1] for p in pairs)
        where = f"{n.span.file}:{n.span.line}:{n.span.column}" if n.span else ""
        report.rows.append(Row(n.id, n.name, n.op, where, max_abs, rel, rel <= tol["value"]))
    outs = [_rel(a, b) for a, b in zip(out_a, out_b)]
    report.output_abs = max((o[0] for o in outs), default=0.0)
    ok = all(r.ok for r in report.rows) and all(o[1] <= tol["value"] for o in outs)

    if grads:
        rng = np.random.default_rng(seed + 7)
        cot = [rng.standard_normal(o.shape) for o in out_a]
        report.grads = _compare_gradients(sides, xs, weights, cot, tol, seed)
        if report.grads:
            report.grad_abs = max(g.error for g in report.grads)
        ok = ok and all(g.ok for g in report.grads)
    if step:
        for s, out in zip(sides, (out_a, out_b)):
            report.steps.append(_compare_steps(s, xs, out, batch, length, tol))
        ok = ok and all(s.ok for s in report.steps)
    report.ok = ok
    return report


def _compare_gradients(sides, xs, weights, cot, tol, seed) -> list[GradRow]:
    auto = [s for s in sides if s.be.autograd]
    if not auto:
        return []
    program = auto[0].program
    if len(auto) == 2:
        ga, gb = (s.gradients(xs, cot) for s in auto)
        rows = []
        for k in ga:
            if k not in gb:
                continue
            _, rel = _rel(ga[k], gb[k])
            layer, where = _layer_of(program, k)
            rows.append(GradRow(k, layer, where, rel, "tensor", rel <= tol["grad"]))
        return rows
    oracle = next(s for s in sides if not s.be.autograd)
    g = auto[0].gradients(xs, cot)
    rng = np.random.default_rng(seed + 11)
    names = _input_names(oracle.graph)
    directions = {k: rng.standard_normal((xs[names.index(k[6:])] if k.startswith("input ") else weights[k]).shape)
                  for k in sorted(g)}
    # A tensor whose true gradient is (analytically) zero - attention's k_proj bias: softmax ignores a
    # per-row shift - has autograd noise for g, so its error is judged against the gradient's overall
    # scale, not its own vanishing norm.
    floor = FD_FLOOR * max((float(np.linalg.norm(g[k] * v)) for k, v in directions.items()), default=0.0)
    rows = []
    for k, v in directions.items():
        if k.startswith("input "):
            i = names.index(k[6:])
            base = xs[i]
        else:
            base = weights[k]
        # an all-zero tensor (a zero-initialised bias; S4D's A_imag with one mode per channel) has no
        # scale of its own: a unit one, not the 1e-3 floor, whose 1e-8 step would leave the central
        # difference to rounding error (|loss| * 1e-16 / 1e-8 against gradients of 1e-6)
        rms = float(np.sqrt(np.mean(base ** 2))) if base.size else 1.0
        eps = FD_EPS * max(rms if rms > 0 else 1.0, 1e-3)

        def f(step):
            if k.startswith("input "):
                moved = list(xs)
                moved[i] = base + step * v
                return oracle.loss(moved, weights, cot)
            return oracle.loss(xs, {**weights, k: base + step * v}, cot)

        def central(h):
            up, down = f(h), f(-h)
            return (up - down) / (2 * h), FD_ROUNDING_ULPS * np.finfo(np.float64).eps * max(abs(up), abs(down)) / h
        gv = float((g[k] * v).sum())
        scale = max(float(np.linalg.norm(g[k] * v)), floor, FD_ABS_FLOOR)
        fd, rounding = central(eps)
        err = max(abs(fd - gv) - rounding, 0.0) / scale
        if err > tol["fd"]:
            # Richardson: (4 D(h/2) - D(h)) / 3 cancels the central difference's h^2 truncation term,
            # which dominates where the gradient itself vanishes (a zero-initialised layer feeding
            # t * silu(t): the cubic term leaves ~1e-10 at h = 1e-5)
            half, rounding_half = central(eps / 2)
            fd = (4 * half - fd) / 3
            err = min(err, max(abs(fd - gv) - (4 * rounding_half + rounding) / 3, 0.0) / scale)
        layer, where = _layer_of(program, k)
        rows.append(GradRow(k, layer, where, err, "directional", err <= tol["fd"]))
    oracle.model.weights = weights
    return rows


def _compare_steps(side, xs, forward, batch, length, tol) -> StepRow:
    try:
        stepped = side.stepped(xs, batch, length)
    except (SeqcError, NotImplementedError) as e:
        return StepRow(side.name, 0.0, True, f"not available ({e})")
    err = max((_rel(a, b)[1] for a, b in zip(forward, stepped)), default=0.0)
    return StepRow(side.name, err, err <= tol["value"])
