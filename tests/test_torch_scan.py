"""Tests for seqc.backends.torch.scan: the selective scan against an explicit
sequential loop (values and gradients), on the numba engine and on the pure
torch fallback (``SEQC_NO_NUMBA=1``)."""
import importlib.util

import pytest
import torch

from seqc.errors import SeqcError

from seqc.backends.torch import scan as S
from seqc.backends.torch.scan import selective_scan, selective_scan_step

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
ENGINES = [pytest.param("numba", marks=pytest.mark.skipif(not HAVE_NUMBA, reason="no numba")),
           "torch"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    monkeypatch.setenv("SEQC_NO_NUMBA", "1" if request.param == "torch" else "0")
    return request.param


def ref_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
             state=None, disc="mamba"):
    """mamba_ssm's selective_scan_ref, one time step at a time."""
    if delta_bias is not None:
        delta = delta + delta_bias
    if delta_softplus:
        delta = torch.log1p(torch.exp(delta))
    x = state if state is not None else u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for t in range(u.shape[1]):
        dtA = delta[:, t, :, None] * A
        if disc == "mamba":
            dB = delta[:, t, :, None] * B[:, t, None, :]
        else:
            dB = torch.expm1(dtA) / A * B[:, t, None, :]
        x = torch.exp(dtA) * x + dB * u[:, t, :, None]
        y = (x * C[:, t, None, :]).sum(-1)
        if D is not None:
            y = y + D * u[:, t]
        if z is not None:
            y = y * z[:, t] * torch.sigmoid(z[:, t])
        ys.append(y)
    return torch.stack(ys, 1), x


def make_inputs(b, L, d, n, dtype=torch.float64, seed=0, grad=False, full=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    args = dict(u=r(b, L, d), delta=r(b, L, d) - 1, A=-torch.exp(r(d, n) * 0.5),
                B=r(b, L, n), C=r(b, L, n))
    if full:
        args.update(D=r(d), z=r(b, L, d), delta_bias=r(d) * 0.1, state=r(b, d, n))
    if grad:
        for v in args.values():
            v.requires_grad_()
    return args


def close(a, b, tol):
    assert a.shape == b.shape
    assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 37, 21, 4), (1, 50, 128, 16), (3, 9, 48, 8)])
def test_forward_matches_loop(engine, dtype, shape):
    args = make_inputs(*shape, dtype=dtype)
    y, x = selective_scan(**args, return_state=True, chunk=8)
    y_ref, x_ref = ref_scan(**args)
    close(y, y_ref, TOL[dtype])
    close(x, x_ref, TOL[dtype])


@pytest.mark.parametrize("disc", ["mamba", "zoh"])
@pytest.mark.parametrize("softplus", [True, False])
def test_forward_options(engine, disc, softplus):
    args = make_inputs(2, 19, 16, 4)
    if not softplus:
        args["delta"] = args["delta"].abs()
    for drop in ([], ["D", "z", "delta_bias", "state"]):
        kw = {k: v for k, v in args.items() if k not in drop}
        y = selective_scan(**kw, delta_softplus=softplus, disc=disc, chunk=5)
        close(y, ref_scan(**kw, delta_softplus=softplus, disc=disc)[0], 1e-10)


@pytest.mark.parametrize("L", [7, 37])
def test_gradcheck_all_inputs(engine, L):
    args = make_inputs(2, L, 3, 4, grad=True)
    names = list(args)

    def f(*vals):
        return selective_scan(**dict(zip(names, vals)), return_state=True, chunk=8)

    assert torch.autograd.gradcheck(f, tuple(args.values()))


def test_gradcheck_zoh(engine):
    args = make_inputs(1, 9, 2, 3, grad=True)
    names = list(args)
    f = lambda *v: selective_scan(**dict(zip(names, v)), disc="zoh", chunk=4)  # noqa: E731
    assert torch.autograd.gradcheck(f, tuple(args.values()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_match_loop_wide(engine, dtype):
    """Realistic widths (vectorised blocks of channels) against autograd of the loop."""
    args = make_inputs(2, 45, 128, 16, dtype=dtype, grad=True, seed=1)
    g = torch.Generator().manual_seed(2)
    gy = torch.randn(2, 45, 128, generator=g, dtype=dtype)
    gx = torch.randn(2, 128, 16, generator=g, dtype=dtype)

    def grads(fn, **kw):
        y, x = fn(**args, **kw)
        return torch.autograd.grad((y, x), list(args.values()), (gy, gx))

    ours = grads(selective_scan, return_state=True, chunk=16)
    ref = grads(ref_scan)
    for name, a, b in zip(args, ours, ref):
        scale = b.abs().max().item() + 1
        assert (a - b).abs().max().item() <= TOL[dtype] * 10 * scale, name


def test_state_handover(engine):
    args = make_inputs(2, 30, 16, 4)
    first = {k: (v[:, :13] if v.dim() == 3 and k != "state" else v) for k, v in args.items()}
    y1, x1 = selective_scan(**first, return_state=True, chunk=4)
    second = {k: (v[:, 13:] if v.dim() == 3 and k != "state" else v) for k, v in args.items()}
    second["state"] = x1
    y2, x2 = selective_scan(**second, return_state=True, chunk=4)
    y, x = selective_scan(**args, return_state=True, chunk=4)
    close(torch.cat([y1, y2], 1), y, 1e-12)
    close(x2, x, 1e-12)


def test_step_loop_matches_forward(engine):
    args = make_inputs(2, 11, 8, 4)
    y, x = selective_scan(**args, return_state=True)
    state, ys = args["state"], []
    for t in range(11):
        y_t, state = selective_scan_step(
            args["u"][:, t], args["delta"][:, t], args["A"], args["B"][:, t], args["C"][:, t],
            args["D"], args["z"][:, t], args["delta_bias"], True, state)
        ys.append(y_t)
    close(torch.stack(ys, 1), y, 1e-12)
    close(state, x, 1e-12)


def test_step_default_state():
    args = make_inputs(3, 1, 5, 2, full=False)
    y_t, state = selective_scan_step(args["u"][:, 0], args["delta"][:, 0], args["A"],
                                     args["B"][:, 0], args["C"][:, 0])
    y_ref, x_ref = ref_scan(**args)
    close(y_t, y_ref[:, 0], 1e-12)
    close(state, x_ref, 1e-12)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(engine, low):
    args = make_inputs(2, 40, 32, 8, dtype=torch.float32)
    y32 = selective_scan(**args)
    lowargs = {k: v.to(low) for k, v in args.items()}
    y, x = selective_scan(**lowargs, return_state=True)
    assert y.dtype == low and x.dtype == low
    ref = ref_scan(**{k: v.float() for k, v in lowargs.items()})[0]
    # Accumulating in float32, the only error left is rounding the output to `low`: at most one ulp of
    # the largest output (bf16 2**-8, fp16 2**-11; measured over 5 seeds: 1.7e-3 and 2.1e-4 of max|ref|).
    ulp = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[low]
    assert (y.float() - ref).abs().max() <= ulp * ref.abs().max()
    # against float32 inputs the inputs' own rounding adds to it (measured 4.1e-3 and 6.5e-4)
    assert (y.float() - y32).abs().max() <= 2.5 * ulp * y32.abs().max()


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunk_sizes_and_tiny_shapes(engine, chunk):
    for shape in [(1, 1, 1, 1), (1, 1, 16, 4), (1, 10, 5, 3)]:
        args = make_inputs(*shape, grad=True)
        y, x = selective_scan(**args, return_state=True, chunk=chunk)
        y_ref, x_ref = ref_scan(**args)
        close(y, y_ref, 1e-10)
        close(x, x_ref, 1e-10)
        g = torch.autograd.grad((y.sum() + x.sum()), list(args.values()))
        g_ref = torch.autograd.grad((y_ref.sum() + x_ref.sum()), list(args.values()))
        for a, b in zip(g, g_ref):
            close(a, b, 1e-10)


def test_no_full_state_saved_for_backward(engine):
    """Activation memory: nothing of size batch*L*D*N is kept for backward."""
    b, L, d, n, chunk = 2, 128, 16, 32, 32
    args = make_inputs(b, L, d, n, dtype=torch.float32, grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = selective_scan(**args, chunk=chunk)
    # a few (b, L, D) tensors, B and C, the chunk checkpoints and small parameters
    allowed = 8 * b * L * d + 2 * b * L * n + b * d * n * (L // chunk) + 4 * d * n
    assert sum(saved) <= allowed < b * L * d * n / 2
    y.sum().backward()
    assert args["state"].grad is not None


def test_numba_engine_selected_when_available(monkeypatch):
    u = torch.zeros(1, 4, 8)
    monkeypatch.setenv("SEQC_NO_NUMBA", "0")
    expect = S._NumbaEngine if HAVE_NUMBA else S._TorchEngine
    assert isinstance(S._pick_engine(u, "mamba", None), expect)
    assert isinstance(S._pick_engine(u, "zoh", None), expect)  # generated from the zoh program too
    monkeypatch.setenv("SEQC_NO_NUMBA", "1")
    assert isinstance(S._pick_engine(u, "mamba", None), S._TorchEngine)


def test_bad_discretization():
    args = make_inputs(1, 2, 2, 2, full=False)
    with pytest.raises(SeqcError, match="unknown discretization"):
        selective_scan(**args, disc="bilinear-ish")


@pytest.mark.skipif(not HAVE_NUMBA, reason="no numba")
@pytest.mark.parametrize("dtype, rel", [("float32", 2e-7), ("float64", 5e-16)])
def test_numba_exp_accuracy(dtype, rel):
    """The kernels' vectorisable exp against numpy's, over the range that matters."""
    import numba
    import numpy as np

    S._numba_kernels()

    @numba.njit
    def apply(x, out):
        for i in range(x.size):
            out[i] = S._exp(x[i])

    x = np.concatenate([np.linspace(-85, 85, 20001), -np.geomspace(1e-12, 80, 2001)]).astype(dtype)
    out = np.empty_like(x)
    apply(x, out)
    expect = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - expect) / expect) < rel
    nan = np.array([np.nan], dtype)
    apply(nan, nan)
    assert np.isnan(nan[0])


@pytest.mark.skipif(not HAVE_NUMBA, reason="no numba")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numba_log1p_accuracy(dtype):
    """The kernels' vectorisable log1p (softplus in the fused prologue) against numpy's in
    long double, in ulps of the result: measured at most 0.77 (float32) / 0.83 (float64)
    over these points, bound 1; the edge cases as numpy gives them."""
    import numba
    import numpy as np

    from seqc.backends.torch import cpu_kernels
    cpu_kernels.numba_module()

    @numba.njit
    def apply(x, out):
        for i in range(x.size):
            out[i] = cpu_kernels._log1p(x[i])

    fi = np.finfo(dtype)
    x = np.concatenate([np.linspace(-1, 1, 40001)[1:], np.geomspace(1e-30, 1e30, 20001),
                        -np.geomspace(1e-30, 1 - 1e-7, 20001), np.linspace(0, 4.9e8, 20001),
                        [fi.max, fi.tiny, -fi.tiny]]).astype(dtype)
    x = x[(x > -1) & (x != 0)]
    out = np.empty_like(x)
    apply(x, out)
    ref = np.log1p(x.astype(np.longdouble))
    ulps = np.abs(out.astype(np.longdouble) - ref) / np.spacing(np.abs(ref).astype(dtype)).astype(np.longdouble)
    assert float(ulps.max()) <= 1.0
    edge = np.array([-1, -2, np.inf, -np.inf, np.nan, 0.0, -0.0], dtype)
    got = np.empty_like(edge)
    apply(edge, got)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(got, np.log1p(edge))
    assert np.signbit(got[-1]) and not np.signbit(got[-2])
