"""The Triton backend on Triton's CPU interpreter (TRITON_INTERPRET=1) at small shapes.

Every generated kernel is checked against an independent reference: the torch
backend's selective scan / layers (values and gradients of every input and
parameter), F.conv1d, a written-out RMSNorm, a plain complex recurrence, and
the NumPy discretizer for the printed discretization.
"""
from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest
import sympy as sp
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from conftest import EXAMPLES, ROOT, example  # noqa: E402

import seqc  # noqa: E402,F401
from seqc import discretization  # noqa: E402
from seqc.backends.torch import scan  # noqa: E402
from seqc.backends.torch.module import build_module as torch_build  # noqa: E402
from seqc.backends.triton import TritonBackend, build_module, cache, codegen, emit, kernels, printer  # noqa: E402
from seqc.compiler import plan_graph  # noqa: E402
from seqc.init import init_weights  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _cache_dir(tmp_path_factory):
    old = os.environ.get("SEQC_CACHE_DIR")
    os.environ["SEQC_CACHE_DIR"] = str(tmp_path_factory.mktemp("seqc-cache"))
    yield
    if old is None:
        os.environ.pop("SEQC_CACHE_DIR", None)
    else:
        os.environ["SEQC_CACHE_DIR"] = old


def maxdiff(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def scan_inputs(b=2, L=19, d=6, n=4, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64).to(dtype).requires_grad_()  # noqa: E731
    A = (-torch.rand(d, n, generator=g, dtype=F64) * 1.5 - 0.2).to(dtype).requires_grad_()
    return dict(u=r(b, L, d), delta=r(b, L, d), A=A, B=r(b, L, n), C=r(b, L, n), D=r(d), z=r(b, L, d),
                delta_bias=r(d), state=r(b, d, n))


ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "state")


def run_both(args, disc, assoc, lengths=None, split=False):
    y, x = kernels.selective_scan(**args, lengths=lengths, disc=disc, assoc=assoc, split=split)
    ref_delta = args["delta"]
    ref_args = dict(args)
    if lengths is not None:     # the torch layer's masking: bias + softplus, then delta = 0 past the length
        ref_delta = F.softplus(args["delta"] + args["delta_bias"])
        keep = torch.arange(ref_delta.shape[1])[None, :] < lengths[:, None]
        ref_delta = torch.where(keep[..., None], ref_delta, torch.zeros((), dtype=ref_delta.dtype))
        ref_args.update(delta_bias=None)
    ref_args["delta"] = ref_delta
    yr, xr = scan.selective_scan(**ref_args, delta_softplus=lengths is None, return_state=True, disc=disc)
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=gen, dtype=F64).to(y.dtype)
    gx = torch.randn(x.shape, generator=gen, dtype=F64).to(x.dtype)
    leaves = [args[k] for k in ORDER]
    g1 = torch.autograd.grad((y, x), leaves, (gy, gx))
    g2 = torch.autograd.grad((yr, xr), leaves, (gy, gx))
    return (y, x, g1), (yr, xr, g2)


# -- printer ----------------------------------------------------------------------------------

class _TL:
    """Just enough of triton.language to run a printed program on NumPy arrays."""
    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    abs = staticmethod(np.abs)
    sqrt = staticmethod(np.sqrt)
    where = staticmethod(np.where)


def _run_printed(program, A, dt):
    env = {"tl": _TL, "_expm1": np.expm1, "A": A, "dt": dt}
    with np.errstate(all="ignore"):
        for name, tree in program:
            env[name] = eval(printer.print_tree(tree), env)   # noqa: S307 - printer output under test
    return env


@pytest.mark.parametrize("method", ["mamba", "zoh", "bilinear", "euler", "backward_euler"])
def test_printed_discretization_and_derivatives(method):
    """The printed program equals the NumPy discretizer; its derivatives equal torch autograd
    through the torch discretizer (including |A dt| inside phi1's Taylor discs)."""
    A = -np.array([1e-9, 1e-5, 3e-3, 0.05, 0.7, 3.0, 11.0])
    dt = np.array([0.5, 2.0, 0.1, 1.5, 0.3, 0.02, 0.9])
    env = _run_printed(printer.diag_discretization(method, grads=True), A, dt)
    abar, gain = discretization.discretizer("diag", method, "numpy")(A, 1.0, dt)
    np.testing.assert_allclose(env["a"], abar, rtol=1e-14, atol=0)
    np.testing.assert_allclose(env["g"] * np.ones_like(A), gain, rtol=1e-13, atol=0)
    At = torch.tensor(A, requires_grad=True)
    dtt = torch.tensor(dt, requires_grad=True)
    a_t, g_t = discretization.discretizer("diag", method, "torch")(At, torch.ones_like(At), dtt)
    for out, name in ((a_t, "a"), (g_t, "g")):
        dA, ddt = torch.autograd.grad(out.sum(), (At, dtt), allow_unused=True, retain_graph=True)
        for got, want in ((env[f"{name}_A"], dA), (env[f"{name}_dt"], ddt)):
            want = np.zeros_like(A) if want is None else want.numpy()
            np.testing.assert_allclose(got * np.ones_like(A), want, rtol=1e-7, atol=1e-12)


def test_printer_refuses_what_it_cannot_print():
    with pytest.raises(seqc.SeqcError, match="no rule"):
        printer.scalar_program({"a": sp.sin(printer.SYM_A)})


# -- selective scan ------------------------------------------------------------------------------

@pytest.mark.parametrize("disc,assoc", [("mamba", True), ("mamba", False), ("zoh", True), ("bilinear", False)])
def test_selective_scan_values_and_gradients_float64(disc, assoc):
    (y, x, g1), (yr, xr, g2) = run_both(scan_inputs(), disc, assoc)
    assert maxdiff(y, yr) < 1e-12 and maxdiff(x, xr) < 1e-12
    for name, a, b in zip(ORDER, g1, g2):
        assert maxdiff(a, b) < 1e-11, name


def test_selective_scan_float32_and_odd_state_size():
    args = scan_inputs(L=13, d=5, n=3, dtype=torch.float32)
    (y, x, g1), (yr, xr, g2) = run_both(args, "zoh", True)
    assert y.dtype == torch.float32 and maxdiff(y, yr) < 2e-5 and maxdiff(x, xr) < 2e-5
    for name, a, b in zip(ORDER, g1, g2):
        assert maxdiff(a, b) < 1e-4 * max(1.0, float(b.abs().max())), name


def test_selective_scan_bfloat16_accumulates_in_float32():
    """bf16 in, bf16 out, float32 state: against the float64 scan of the same (rounded) inputs."""
    args = {k: v.detach() for k, v in scan_inputs(L=16, d=4, n=4, dtype=torch.bfloat16).items()}
    y, x = kernels.selective_scan(**args)
    yr, xr = scan.selective_scan(**{k: v.double() for k, v in args.items()}, return_state=True)
    assert y.dtype == torch.bfloat16 and x.dtype == torch.float32
    scale = max(1.0, float(yr.abs().max()))
    assert maxdiff(y, yr) < 2 ** -8 * scale            # one bf16 rounding of the output
    assert maxdiff(x, xr) < 1e-5 * max(1.0, float(xr.abs().max()))
    leaves = [v.requires_grad_() for v in args.values()]
    y, x = kernels.selective_scan(**args)
    grads = torch.autograd.grad((y.float().sum() + x.sum()), leaves)
    assert all(g.dtype == v.dtype and torch.isfinite(g.float()).all() for g, v in zip(grads, leaves))


@pytest.mark.parametrize("split", [False, True])
def test_selective_scan_lengths(split):
    """Also the chunk-parallel forward (split): its carried chunk states are the backward's checkpoints."""
    lengths = torch.tensor([19, 6])
    (y, x, g1), (yr, xr, g2) = run_both(scan_inputs(), "zoh" if split else "mamba", False, lengths=lengths,
                                        split=split)
    assert maxdiff(y, yr) < 1e-12 and maxdiff(x, xr) < 1e-12
    for name, a, b in zip(ORDER, g1, g2):
        assert maxdiff(a, b) < 1e-11, name


def test_step_kernel_matches_torch_step_and_updates_in_place():
    args = {k: v.detach() for k, v in scan_inputs(L=1).items()}
    step_args = {k: (v[:, 0] if k in ("u", "delta", "B", "C", "z") else v) for k, v in args.items()}
    state = step_args.pop("state").clone()
    for disc in ("mamba", "zoh"):
        yr, xr = scan.selective_scan_step(step_args["u"], step_args["delta"], step_args["A"], step_args["B"],
                                          step_args["C"], step_args["D"], step_args["z"], step_args["delta_bias"],
                                          True, state.clone(), disc)
        mine = state.clone()
        y, x = kernels.selective_step(**step_args, state=mine, disc=disc)
        assert x.data_ptr() == mine.data_ptr()
        assert maxdiff(y, yr) < 1e-14 and maxdiff(x, xr) < 1e-14


# -- conv1d, rmsnorm, LTI --------------------------------------------------------------------------

@pytest.mark.parametrize("act", ["silu", "identity", "tanh"])
def test_conv1d_forward_backward_against_f_conv1d(act):
    g = torch.Generator().manual_seed(3)
    b, L, d, k = 2, 11, 6, 4
    x, w, bias, win = (torch.randn(*s, generator=g, dtype=F64, requires_grad=True)
                       for s in ((b, L, d), (d, 1, k), (d,), (b, d, k - 1)))
    y, _ = kernels.conv1d(x, w, bias, win, act)
    fn = {"silu": F.silu, "identity": lambda t: t, "tanh": torch.tanh}[act]
    yr = fn(F.conv1d(torch.cat([win, x.transpose(1, 2)], -1), w, bias, groups=d)).transpose(1, 2)
    gy = torch.randn(y.shape, generator=g, dtype=F64)
    assert maxdiff(y, yr) < 1e-13
    for a, r in zip(torch.autograd.grad(y, (x, w, bias, win), gy), torch.autograd.grad(yr, (x, w, bias, win), gy)):
        assert maxdiff(a, r) < 1e-12


def test_conv1d_step_kernel_shifts_the_window_in_place():
    g = torch.Generator().manual_seed(9)
    b, d, k = 2, 6, 4
    x, w, bias = (torch.randn(*s, generator=g, dtype=F64) for s in ((b, 3, d), (d, 1, k), (d,)))
    window = torch.randn(b, d, k - 1, generator=g, dtype=F64)
    mine = window.clone()
    for t in range(3):
        y, out = kernels.conv1d_step(x[:, t], w, bias, mine, "silu")
        assert out.data_ptr() == mine.data_ptr()
        full = torch.cat([window, x[:, t, :, None]], -1)
        assert maxdiff(y, F.silu((full * w[:, 0]).sum(-1) + bias)) < 1e-14
        window = full[..., 1:]
        assert maxdiff(mine, window) == 0


def test_rmsnorm_with_residual_against_formula():
    g = torch.Generator().manual_seed(4)
    x, r = (torch.randn(2, 5, 6, generator=g, dtype=F64, requires_grad=True) for _ in range(2))
    w = torch.randn(6, generator=g, dtype=F64, requires_grad=True)
    y, s = kernels.rmsnorm(x, w, 1e-5, residual=r)
    sr = x + r
    yr = sr / torch.sqrt(sr.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    assert maxdiff(y, yr) < 1e-14 and maxdiff(s, sr) == 0
    for a, b in zip(torch.autograd.grad((y, s), (x, r, w), (gy, gs)),
                    torch.autograd.grad((yr, sr), (x, r, w), (gy, gs))):
        assert maxdiff(a, b) < 1e-13


def test_lti_kernel_against_complex_recurrence():
    """Values, final state at each length, and gradients of every input against torch autograd
    through a plain complex recurrence."""
    g = torch.Generator().manual_seed(5)
    b, L, H, S = 2, 10, 5, 3
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64).requires_grad_()  # noqa: E731
    ar = (-torch.rand(H, S, generator=g, dtype=F64)).requires_grad_()
    ai, br, bi, cr, ci = r(H, S), r(H, S), r(H, S), r(H, S), r(H, S)
    u, D, state = r(b, L, H), r(H), r(b, H, S, 2)
    leaves = (u, ar, ai, br, bi, cr, ci, D, state)
    a = torch.exp(torch.complex(ar, ai))
    Bb, C = torch.complex(br, bi), torch.complex(cr, ci)
    lengths = torch.tensor([10, 4])
    y, xL = kernels.lti_scan(u, a, Bb, C, D, state, lengths)
    x, ys, finals = torch.complex(state[..., 0], state[..., 1]), [], {}
    for t in range(L):
        x = a * x + Bb * u[:, t, :, None]
        ys.append(2 * (C * x).sum(-1).real + D * u[:, t])
        finals[t + 1] = x
    yr = torch.stack(ys, 1)
    want = torch.stack([finals[10][0], finals[4][1]])
    xr = torch.stack([want.real, want.imag], -1)
    assert maxdiff(y, yr) < 1e-13 and maxdiff(xL, xr) < 1e-14
    gy, gx = torch.randn(y.shape, generator=g, dtype=F64), torch.randn(xL.shape, generator=g, dtype=F64)
    for name, p, q in zip(("u", "ar", "ai", "br", "bi", "cr", "ci", "D", "state"),
                          torch.autograd.grad((y, xL), leaves, (gy, gx), retain_graph=True),
                          torch.autograd.grad((yr, xr), leaves, (gy, gx))):
        assert maxdiff(p, q) < 1e-12, name


# -- whole models through build_module -----------------------------------------------------------

def _models(spec, params, mode="auto", dtype=F64):
    graph = plan_graph(example(spec), "torch", params, mode)
    weights = init_weights(graph, seed=0)
    return torch_build(graph, weights).to(dtype), build_module(graph, weights).to(dtype), graph


MAMBA = dict(n_layers=1, d_model=4, d_state=4, expand=2, d_conv=3)


def test_mamba_example_values_gradients_state_and_lengths(monkeypatch):
    ref, tri, _ = _models("mamba.seq", MAMBA)
    assert list(ref.state_dict()) == list(tri.state_dict())
    kinds = {type(m).__module__.rsplit(".", 1)[-1] + "." + type(m).__name__ for m in tri.modules()}
    assert {"layers.SelectiveSSM", "layers.Conv1d", "layers.RMSNorm"} <= kinds
    assert "seqc.backends.triton.layers" in {type(m).__module__ for m in tri.modules()}
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 12, 4, generator=g, dtype=F64, requires_grad=True)
    s0 = ref.init_state(2)
    y1, st1 = tri(x, return_state=True)
    y0, st0 = ref(x, return_state=True)
    assert maxdiff(y1, y0) < 1e-13
    for k in st0:
        for name in st0[k]:
            assert maxdiff(st1[k][name], st0[k][name]) < 1e-13
    gy = torch.randn(y1.shape, generator=g, dtype=F64)
    p1, p0 = [x, *tri.parameters()], [x, *ref.parameters()]
    for (name, _), a, b in zip([("x", 0), *tri.named_parameters()], torch.autograd.grad(y1, p1, gy),
                               torch.autograd.grad(y0, p0, gy)):
        assert maxdiff(a, b) < 1e-11, name
    # state in, lengths
    y1, _ = tri(x[:, 6:], state=st1, return_state=True)
    y0, _ = ref(x[:, 6:], state=st0, return_state=True)
    assert maxdiff(y1, y0) < 1e-13
    lengths = torch.tensor([12, 5])
    y1, st1 = tri(x, return_state=True, lengths=lengths)
    y0, st0 = ref(x, return_state=True, lengths=lengths)
    assert maxdiff(y1[0], y0[0]) < 1e-13 and maxdiff(y1[1, :5], y0[1, :5]) < 1e-13
    for k in st0:
        for name in st0[k]:
            assert maxdiff(st1[k][name], st0[k][name]) < 1e-13
    used = []
    for name in ("selective_step", "conv1d_step"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: used.append(_name) or _real(*a, **k))
    with torch.no_grad():
        s1 = tri.init_state(2)
        for t in range(4):
            a, s1 = tri.step(x[:, t], s1)
            b, s0 = ref.step(x[:, t], s0)
            assert maxdiff(a, b) < 1e-13
    assert used.count("selective_step") == 4 and used.count("conv1d_step") == 4


def test_s4d_example_scan_kernel():
    ref, tri, _ = _models("s4d.seq", dict(d_model=4, d_state=6), mode="scan")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 12, 4, generator=g, dtype=F64)
    with torch.no_grad():
        tri.ssm.last_plan = None
        y1, st1 = tri(x, return_state=True, lengths=torch.tensor([12, 7]))
        assert tri.ssm.last_plan == "scan" and type(tri.ssm).__module__.endswith("triton.layers")
        y0, st0 = ref(x, return_state=True, lengths=torch.tensor([12, 7]))
    assert maxdiff(y1[0], y0[0]) < 1e-12 and maxdiff(y1[1, :7], y0[1, :7]) < 1e-12
    assert maxdiff(st1["ssm"]["x"], st0["ssm"]["x"]) < 1e-12
    with torch.no_grad():
        s1, s0 = tri.init_state(2), ref.init_state(2)
        for t in range(3):
            a, s1 = tri.step(x[:, t], s1)
            b, s0 = ref.step(x[:, t], s0)
            assert maxdiff(a, b) < 1e-13 and maxdiff(s1["ssm"]["x"], s0["ssm"]["x"]) < 1e-13
    xg = x.clone().requires_grad_()
    tri.ssm.last_plan = None
    y1, y0 = tri(xg), ref(xg)
    assert tri.ssm.last_plan == "scan"
    gy = torch.randn(y1.shape, generator=g, dtype=F64)
    for (name, _), a, b in zip([("x", 0), *tri.named_parameters()],
                               torch.autograd.grad(y1, [xg, *tri.parameters()], gy),
                               torch.autograd.grad(y0, [xg, *ref.parameters()], gy)):
        assert maxdiff(a, b) < 1e-11, name


SMALL = {"d_model": 8, "n_layers": 1, "d_state": 4, "n_heads": 2, "vocab": 11, "hidden": 8}


@pytest.mark.parametrize("name", sorted(os.path.basename(p) for p in EXAMPLES))
def test_every_example_agrees_with_the_torch_backend(name):
    """Outputs and gradients (input and every parameter) of each example, Triton vs torch, float64."""
    from seqc.inputs import random_inputs
    path = example(name)
    header = re.search(r"^model \w+\((.*?)\)\s*\{", open(path).read(), re.M | re.S).group(1)
    params = {k: v for k, v in SMALL.items() if re.search(rf"\b{k}\s*=", header)}
    assert "d_model" in params
    ref, tri, graph = _models(name, params)
    xs = [torch.as_tensor(x) for x in random_inputs(graph, 2, 9, np.random.default_rng(0))]
    xs = [x.double().requires_grad_() if x.is_floating_point() else x for x in xs]
    y1, y0 = tri(*xs), ref(*xs)
    assert maxdiff(y1, y0) < 1e-12
    gy = torch.randn(y1.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    leaves1 = [x for x in xs if x.requires_grad] + list(tri.parameters())
    leaves0 = [x for x in xs if x.requires_grad] + list(ref.parameters())
    g1 = torch.autograd.grad(y1, leaves1, gy, allow_unused=True)
    g0 = torch.autograd.grad(y0, leaves0, gy, allow_unused=True)
    for a, b in zip(g1, g0):
        assert (a is None) == (b is None) and (a is None or maxdiff(a, b) < 1e-10)


# -- derivation -> kernel -------------------------------------------------------------------------

def test_changing_the_derivation_changes_the_kernel_and_its_results():
    args = {k: v.detach() for k, v in scan_inputs(L=9, d=4, n=4, seed=8).items()}
    before_src = codegen.discretization_source("mamba")
    y_before, _ = kernels.selective_scan(**args)
    A, B, dt = discretization.A, discretization.B, discretization.dt
    with discretization.override("diag", "mamba", sp.exp(A * dt), B * dt / (1 - A * dt)):
        after_src = codegen.discretization_source("mamba")
        assert "(1.0 - " in after_src and "(1.0 - " not in before_src
        assert after_src in codegen.module_source("mamba")
        y_after, _ = kernels.selective_scan(**args)
    # the overridden scheme written out: x_t = exp(A dt) x + dt / (1 - A dt) B u, y = <C, x> + D u, gated
    dt_ = F.softplus(args["delta"] + args["delta_bias"]).unsqueeze(-1)
    a_, g_ = torch.exp(args["A"] * dt_), dt_ / (1 - args["A"] * dt_)
    x, ys = args["state"], []
    for t in range(args["u"].shape[1]):
        x = a_[:, t] * x + g_[:, t] * args["B"][:, t, None, :] * args["u"][:, t, :, None]
        ys.append((x * args["C"][:, t, None, :]).sum(-1) + args["D"] * args["u"][:, t])
    y_ref = torch.stack(ys, 1) * F.silu(args["z"])
    assert maxdiff(y_after, y_before) > 1e-3
    assert maxdiff(y_after, y_ref) < 1e-12
    assert maxdiff(kernels.selective_scan(**args)[0], y_before) == 0


# -- cache, backend object, emit, benchmark ---------------------------------------------------------

def test_kernel_cache_files_are_hash_named_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQC_CACHE_DIR", str(tmp_path))
    src = "import triton\nVALUE = 41\n"
    mod = cache.load(src, key="t")
    assert mod.VALUE == 41 and cache.load(src, key="t") is mod
    files = list((tmp_path / "triton").glob("k_*.py"))
    assert [f.name for f in files] == [f"k_{cache.digest(src, 't')}.py"] and files[0].read_text() == src
    assert cache.load(src.replace("41", "42"), key="t").VALUE == 42
    assert len(list((tmp_path / "triton").glob("k_*.py"))) == 2
    assert not list((tmp_path / "triton").glob("*.tmp"))
    calls = []
    pick = cache.block_sizes("k", (8, 16), [{"B": 1}, {"B": 2}], bench=lambda c: calls.append(c) or -c["B"])
    assert pick == {"B": 2} and len(calls) == 2
    assert cache.block_sizes("k", (8, 16), [{"B": 1}, {"B": 2}], bench=lambda c: 1 / 0) == {"B": 2}


def test_backend_object_and_emit():
    backend = TritonBackend()
    assert backend.available() is None and backend.name == "triton"
    _, tri, graph = _models("mamba.seq", MAMBA)
    text = backend.emit(graph)
    assert "@triton.jit" in text and "def scan_fwd(" in text and "def conv_fwd(" in text
    assert ("(selective_ssm): scan_fwd, scan_bwd, scan_step {'delta_bias': False, 'delta_softplus': True, "
            "'disc': 'mamba', 'd_skip': True, 'gate': 'silu'}") in text
    assert "tl.exp((A * dt))" in text                     # the printed discretization of 'mamba'
    assert all(backend.supports(n) for n in graph.layers() if n.op in ("selective_ssm", "conv1d", "rmsnorm"))
    assert not any(backend.supports(n) for n in graph.layers() if n.op == "linear")


def test_availability_reason_without_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "TRITON_INTERPRET=1" in TritonBackend().available()


def test_layers_without_a_kernel_keep_the_torch_path():
    """conv1d with gelu (no kernel activation) runs torch's code, inside a Triton-built model."""
    src = "model M(d = 4) {\n  input x: [B, L, d]\n  c = conv1d(x, kernel = 3, activation = gelu)\n  return c\n}\n"
    graph = plan_graph(src, "torch")
    weights = init_weights(graph, seed=0)
    tri, ref = build_module(graph, weights).double(), torch_build(graph, weights).double()
    x = torch.randn(2, 7, 4, dtype=F64)
    assert type(tri.c).__module__.endswith("triton.layers")
    assert maxdiff(tri(x), ref(x)) < 1e-14 and "c (conv1d): torch" in emit(graph)


@pytest.mark.skipif(not torch.cuda.is_available() or codegen.interpreted(), reason="needs a CUDA GPU (the "
                    "interpreter cannot run libdevice.expm1 or time block sizes)")
def test_gpu_kernels_with_libdevice_and_tuned_blocks():
    """On a GPU: the libdevice source, tuned block sizes (L >= 1024) and bf16 against the torch scan."""
    for disc, dtype, tol in (("zoh", torch.float32, 1e-4), ("mamba", torch.bfloat16, 3e-2)):
        args = {k: v.detach().cuda() for k, v in scan_inputs(b=2, L=1500, d=64, n=16, dtype=dtype).items()}
        y, x = kernels.selective_scan(**args, disc=disc)
        yr, xr = scan.selective_scan(**{k: v.double() for k, v in args.items()}, disc=disc, return_state=True)
        assert maxdiff(y, yr) < tol * max(1.0, float(yr.abs().max()))
        assert maxdiff(x, xr) < 1e-4 * max(1.0, float(xr.abs().max()))


def test_benchmark_runs_tiny_on_the_interpreter(capsys, monkeypatch):
    monkeypatch.setenv("SEQC_NO_NUMBA", "1")
    sys.path.insert(0, ROOT)
    from benchmarks import gpu_scan
    gpu_scan.main(["--tiny"])
    out = capsys.readouterr().out
    for expected in ("selective scan", "max |triton - torch|", "associative_scan", "mambapy", "bfloat16"):
        assert expected in out
    rel = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "max |triton - torch|" in line]
    assert len(rel) == 2 and rel[0] < 1e-5 and rel[1] < 2e-2      # float32, bfloat16
