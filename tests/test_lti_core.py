"""The time-invariant complex diagonal SSM (``ssm`` kinds diag = S4D and s5) on the
generic recurrence core (``scan.lti_scan``: generated numba kernels, torch fallback
with ``SEQC_NO_NUMBA=1``): the core against a plain loop of x_t = a x_{t-1} + Bbar u_t
(values and autograd gradients, lengths, states), the numba engine against the torch
one, and the layer against an independent NumPy loop of the S4D / S5 semantics
(ZOH written out here), with every plan agreeing on values and gradients."""
import importlib.util

import numpy as np
import pytest
import torch

import seqc
from seqc.backends.torch.scan import lti_scan

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
ENGINES = [pytest.param("numba", marks=pytest.mark.skipif(not HAVE_NUMBA, reason="no numba")), "torch"]
# measured (this suite): float64 <= 5e-13 (core vs loop), 2e-15 (plans); float32 <= 1e-6
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
CPLX = {torch.float64: torch.complex128, torch.float32: torch.complex64}


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    monkeypatch.setenv("SEQC_NO_NUMBA", "1" if request.param == "torch" else "0")
    return request.param


def loop(u, a, Bbar, C, x0, lengths, complex_out):
    """The recurrence one step at a time, in plain torch ops (autograd differentiates it)."""
    x, states, ws = x0, [x0], []
    for t in range(u.shape[1]):
        x = a * x + Bbar * u[:, t, :, None]
        states.append(x)
        ws.append((C * x).sum(-1))
    w = torch.stack(ws, 1)
    states = torch.stack(states, 1)
    final = states[:, -1] if lengths is None else states[torch.arange(u.shape[0]), lengths]
    return (w if complex_out else w.real), final


def _problem(dtype, complex_in, batch=3, length=37, h=8, s=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    c = lambda *shape: torch.complex(r(*shape), r(*shape))  # noqa: E731
    u = c(batch, length, h) if complex_in else r(batch, length, h)
    a = torch.polar(0.65 + 0.3 * torch.rand(h, s, generator=g, dtype=dtype), 3 * torch.rand(h, s, generator=g,
                                                                                          dtype=dtype))
    return [u, a, c(h, s), c(h, s), c(batch, h, s)]


def _loss(w, x, seed=1):
    g = torch.Generator().manual_seed(seed)
    gw = torch.randn(w.shape + ((2,) if w.is_complex() else ()), generator=g, dtype=torch.float64).to(w.real.dtype)
    gx = torch.randn(x.shape + (2,), generator=g, dtype=torch.float64).to(x.real.dtype)
    wr = torch.view_as_real(w) if w.is_complex() else w
    return (wr * gw).sum() + (torch.view_as_real(x) * gx).sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("complex_in,complex_out", [(False, False), (True, True), (False, True), (True, False)])
@pytest.mark.parametrize("lengths", [None, [0, 5, 37]])
@pytest.mark.parametrize("chunk", [None, 8])
def test_core_matches_loop(engine, dtype, complex_in, complex_out, lengths, chunk):
    leaves = [t.requires_grad_() for t in _problem(dtype, complex_in)]
    lens = None if lengths is None else torch.tensor(lengths)
    w, x = lti_scan(*leaves, lengths=lens, complex_out=complex_out, chunk=chunk)
    wr, xr = loop(*leaves, lens, complex_out)
    scale = wr.abs().max()
    assert (w - wr).abs().max() <= TOL[dtype] * scale
    assert (x - xr).abs().max() <= TOL[dtype] * xr.abs().max()
    got = torch.autograd.grad(_loss(w, x), leaves)
    want = torch.autograd.grad(_loss(wr, xr), leaves)
    for name, g1, g2 in zip(("u", "a", "Bbar", "C", "x0"), got, want):
        assert (g1 - g2).abs().max() <= TOL[dtype] * g2.abs().max(), name


@pytest.mark.skipif(not HAVE_NUMBA, reason="no numba")
@pytest.mark.parametrize("complex_in", [False, True])
def test_numba_and_torch_engines_agree(monkeypatch, complex_in):
    leaves = [t.requires_grad_() for t in _problem(torch.float64, complex_in, length=70, h=16, s=4, seed=3)]
    lens = torch.tensor([70, 1, 33])
    runs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("SEQC_NO_NUMBA", flag)
        w, x = lti_scan(*leaves, lengths=lens, complex_out=complex_in)
        runs.append((w, x, torch.autograd.grad(_loss(w, x), leaves)))
    (w1, x1, g1), (w2, x2, g2) = runs
    assert (w1 - w2).abs().max() <= 1e-12 * w2.abs().max()
    assert (x1 - x2).abs().max() <= 1e-12 * x2.abs().max()
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()


def test_core_length_zero(engine):
    u, a, B, C, x0 = _problem(torch.float64, False, length=0)
    w, x = lti_scan(u, a, B, C, x0)
    assert w.shape == (3, 0, 8) and torch.equal(x, x0)


# --------------------------------------------------------------------------- #
# the layer: independent NumPy reference and plan agreement
# --------------------------------------------------------------------------- #
def _spec(kind, h=6, n=8):
    return f"""model M(d_model = {h}, d_state = {n}) {{
  input u: [B, L, d_model]
  s = ssm(u, d_state = d_state, kind = {kind})
  return s
}}"""


def numpy_reference(kind, p, u, x0=None):
    """y_t = 2 Re(C x_t) + D u_t, x_t = Abar x_{t-1} + Bbar u_t with ZOH Abar = exp(dt A),
    Bbar = (exp(dt A) - 1) / A (times B for s5), written out from the S4D / S5 definitions."""
    p = {k: v.detach().double().numpy() for k, v in p.items()}
    if kind == "diag":
        A = -np.exp(p["log_A_real"]) + 1j * p["A_imag"]                       # (H, M)
        dtA = np.exp(p["log_dt"])[:, None] * A
        Abar, Bbar, C = np.exp(dtA), (np.exp(dtA) - 1) / A, p["C"][..., 0] + 1j * p["C"][..., 1]
        x = np.zeros((u.shape[0],) + A.shape, complex) if x0 is None else x0
        ys = []
        for t in range(u.shape[1]):
            x = Abar * x + Bbar * u[:, t, :, None]
            ys.append(2 * (C * x).sum(-1).real + p["D"] * u[:, t])
        return np.stack(ys, 1), x
    lam = p["Lambda_re"] + 1j * p["Lambda_im"]                                  # (P,)
    dtA = np.exp(p["log_step"]) * lam
    Abar = np.exp(dtA)
    Bbar = ((Abar - 1) / lam)[:, None] * (p["B"][..., 0] + 1j * p["B"][..., 1])  # (P, H)
    C = p["C"][..., 0] + 1j * p["C"][..., 1]                                    # (H, P)
    x = np.zeros((u.shape[0], lam.shape[0]), complex) if x0 is None else x0
    ys = []
    for t in range(u.shape[1]):
        x = Abar * x + u[:, t] @ Bbar.T
        ys.append(2 * (x @ C.T).real + p["D"] * u[:, t])
    return np.stack(ys, 1), x


def _models(kind, dtype, **kw):
    models = {m: seqc.compile(_spec(kind, **kw), mode=m) for m in ("conv", "scan", "recurrent")}
    sd = models["conv"].state_dict()
    for m in models.values():
        m.load_state_dict(sd)
        m.to(dtype)
    return models


@pytest.mark.parametrize("kind", ["diag", "s5"])
def test_layer_matches_numpy_loop(engine, kind):
    model = seqc.compile(_spec(kind), mode="scan").double()
    layer = model.get_submodule("s")
    u = torch.randn(2, 40, 6, dtype=torch.float64)
    state = model.init_state(2)
    x0 = torch.randn_like(state["s"]["x"])
    y, st = model(u, state={"s": {"x": x0}}, return_state=True)
    x0c = x0[..., 0].numpy() + 1j * x0[..., 1].numpy()
    want, xw = numpy_reference(kind, dict(layer.named_parameters()), u.numpy(), x0c)
    assert np.abs(y.detach().numpy() - want).max() <= 1e-10 * np.abs(want).max()
    xs = st["s"]["x"].detach().numpy()
    assert np.abs(xs[..., 0] + 1j * xs[..., 1] - xw).max() <= 1e-10 * np.abs(xw).max()


@pytest.mark.parametrize("kind", ["diag", "s5"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_plans_agree_values_and_gradients(engine, kind, dtype):
    """conv, scan and recurrent plans: outputs, final states (with lengths) and the gradients of
    every parameter, the input and the initial state."""
    models = _models(kind, dtype)
    g = torch.Generator().manual_seed(5)
    u0 = torch.randn(3, 45, 6, generator=g, dtype=torch.float64).to(dtype)
    x00 = torch.randn_like(models["conv"].init_state(3)["s"]["x"], dtype=torch.float64).to(dtype)
    lens = torch.tensor([45, 0, 19])
    res = {}
    for name, m in models.items():
        u, x0 = u0.clone().requires_grad_(), x00.clone().requires_grad_()
        y, st = m(u, state={"s": {"x": x0}}, return_state=True, lengths=lens)
        loss = (y * torch.sin(u0)).sum() + (st["s"]["x"] * torch.cos(x00)).sum()
        params = dict(m.named_parameters())
        grads = torch.autograd.grad(loss, [u, x0, *params.values()])
        res[name] = [y, st["s"]["x"], *grads]
    tol = TOL[dtype]
    for name in ("scan", "recurrent"):
        for i, (a, b) in enumerate(zip(res[name], res["conv"])):
            assert (a - b).abs().max() <= tol * b.abs().max(), (name, i)


@pytest.mark.parametrize("kind", ["diag", "s5"])
def test_gradients_match_plain_torch_loop(engine, kind):
    """Parameter gradients of the scan plan against autograd through the NumPy reference's loop
    written in torch (its own ZOH, not seqc's discretization)."""
    model = seqc.compile(_spec(kind), mode="scan").double()
    p = dict(model.get_submodule("s").named_parameters())
    u = torch.randn(2, 30, 6, dtype=torch.float64)
    cot = torch.randn(2, 30, 6, dtype=torch.float64)
    got = torch.autograd.grad((model(u) * cot).sum(), list(p.values()))
    q = {k: v.detach().clone().requires_grad_() for k, v in p.items()}
    cx = lambda t: torch.complex(t[..., 0], t[..., 1])  # noqa: E731
    if kind == "diag":
        A = torch.complex(-torch.exp(q["log_A_real"]), q["A_imag"])
        dtA = torch.exp(q["log_dt"])[:, None] * A
        Abar, Bbar, C = torch.exp(dtA), torch.expm1(dtA) / A, cx(q["C"])
        x, ys = torch.zeros(2, *A.shape, dtype=A.dtype), []
        for t in range(30):
            x = Abar * x + Bbar * u[:, t, :, None]
            ys.append(2 * (C * x).sum(-1).real + q["D"] * u[:, t])
    else:
        lam = torch.complex(q["Lambda_re"], q["Lambda_im"])
        dtA = torch.exp(q["log_step"]) * lam
        Abar, Bbar, C = torch.exp(dtA), (torch.expm1(dtA) / lam)[:, None] * cx(q["B"]), cx(q["C"])
        x, ys = torch.zeros(2, lam.shape[0], dtype=lam.dtype), []
        for t in range(30):
            x = Abar * x + u[:, t].to(Bbar.dtype) @ Bbar.T
            ys.append(2 * (x @ C.T).real + q["D"] * u[:, t])
    want = torch.autograd.grad((torch.stack(ys, 1) * cot).sum(), list(q.values()))
    for name, a, b in zip(p, got, want):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max(), name


@pytest.mark.parametrize("kind", ["diag", "s5"])
def test_step_continues_forward(engine, kind):
    model = seqc.compile(_spec(kind), mode="scan").double()
    u = torch.randn(2, 20, 6, dtype=torch.float64)
    y, st = model(u[:, :12], return_state=True)
    ys = []
    for t in range(12, 20):
        yt, st = model.step(u[:, t], st)
        ys.append(yt)
    full = model(u)
    assert (torch.cat([y, torch.stack(ys, 1)], 1) - full).abs().max() <= 1e-10 * full.abs().max()


@pytest.mark.skipif(not HAVE_NUMBA, reason="no numba")
def test_scan_plan_uses_the_numba_kernels(monkeypatch):
    """The CPU scan plan of diag runs the generated kernels (not a torch loop): the kernel is called."""
    from seqc.backends.torch import cpu_kernels
    monkeypatch.setenv("SEQC_NO_NUMBA", "0")
    calls = []
    real = cpu_kernels.lti_kernels

    def spy(*args):
        calls.append(args)
        return real(*args)
    monkeypatch.setattr(cpu_kernels, "lti_kernels", spy)
    model = seqc.compile(_spec("diag"), mode="scan")
    model(torch.randn(1, 5, 6))
    assert calls == [(False, False)]
