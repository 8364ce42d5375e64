"""Scalar programs (seqc.scalar) and the discretization programs lowered into them.

References: sympy's lambdify of the *raw* derivation (before the safe rewrite)
evaluated by mpmath at 50 digits; sympy's own derivatives of it; central finite
differences.  Every printer (numpy, torch, numba scalar Python) is checked.
"""
import math

import mpmath
import numpy as np
import pytest
import sympy as sp
import torch

from seqc import discretization as disc
from seqc.errors import SeqcError
from seqc.scalar import PRINTERS, Printer, ScalarProgram, register_printer

TARGETS = ["numpy", "torch", "numba"]


def _raw_reference(method):
    """mpmath functions of the raw (Abar, Bbar) expressions (their A != 0 branch: no sample is 0)."""
    fns = [sp.lambdify((disc.A, disc.B, disc.dt), _generic(e), modules="mpmath") for e in disc.raw_derivation(method)]

    def ref(a, b, dt):
        with mpmath.workdps(50):
            return tuple(complex(f(mpmath.mpmathify(a), mpmath.mpmathify(b), mpmath.mpf(dt))) for f in fns)
    return ref


def _generic(e):
    e = sp.piecewise_fold(e)
    return e.args[0][0] if isinstance(e, sp.Piecewise) else e


def _run(program, target, *args):
    """Evaluate a printed program over arrays (the numba target is scalar Python: loop)."""
    fn = program.compile(target)
    if target == "torch":
        return [np.broadcast_to(torch.as_tensor(o).numpy(), args[0].shape)
                for o in fn(*(torch.as_tensor(a) for a in args))]
    if target == "numba":
        outs = [fn(*(float(a[i]) for a in args)) for i in range(len(args[0]))]
        return [np.array(col) for col in zip(*outs)]
    return [np.broadcast_to(o, args[0].shape) for o in fn(*args)]


def _samples(rng, complex_):
    """A values incl. the Taylor disc (|A dt| < 1e-4), its edge and ordinary ones; dt > 0."""
    mags = np.concatenate([10.0 ** rng.uniform(-9, -4.3, 30), 10.0 ** rng.uniform(-4.2, 0.8, 60), [1e-4 * 0.999]])
    ang = rng.uniform(0, 2 * np.pi, mags.size) if complex_ else rng.choice([0.0, np.pi], mags.size)
    dt = rng.uniform(0.2, 1.0, mags.size)
    a = mags * np.exp(1j * ang) / dt
    return (a if complex_ else a.real), rng.standard_normal(mags.size) + (1j * rng.standard_normal(mags.size)
                                                                          if complex_ else 0), dt


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("method", disc.METHODS)
def test_printed_programs_match_the_raw_derivation(method, complex_, target):
    rng = np.random.default_rng(hash((method, complex_)) % 2**32)
    a, b, dt = _samples(rng, complex_)
    prog = disc.program("diag", method)
    ref = _raw_reference(method)
    want = np.array([ref(ai, bi, ti) for ai, bi, ti in zip(a, b, dt)])
    if complex_:
        out = _run(prog.complex, target, a.real, a.imag, b.real, b.imag, dt)
        got = np.stack([out[0] + 1j * out[1], out[2] + 1j * out[3]], 1)
    else:
        out = _run(prog.real, target, a, b, dt)
        got = np.stack(out, 1)
    err = np.abs(got - want) / np.maximum(np.abs(want), 1e-300)
    assert err.max() < 1e-13, (method, float(err.max()), a[err.max(1).argmax()])


@pytest.mark.parametrize("method", disc.METHODS)
def test_kernel_programs_and_derivatives(method):
    """The CPU kernels' programs: Abar, gain = Bbar/B, and d/dA, d/ddt of both, against sympy's
    derivatives of the raw derivation (mpmath) and against central differences."""
    prog = disc.program("diag", method)
    abar, bbar = (_generic(e) for e in disc.raw_derivation(method))
    gain = bbar / disc.B
    exprs = {"Abar": abar, "gain": gain}
    refs = {f"d{k}_d{v}": sp.lambdify((disc.A, disc.dt), sp.diff(e, s), modules="mpmath")
            for k, e in exprs.items() for v, s in (("A", disc.A), ("dt", disc.dt))}
    vals = {k: sp.lambdify((disc.A, disc.dt), e, modules="mpmath") for k, e in exprs.items()}
    rng = np.random.default_rng(3)
    A = -np.concatenate([10.0 ** rng.uniform(-8, -4.5, 10), 10.0 ** rng.uniform(-3.5, 0.5, 20), [3e-3, 2e-2]])
    dt = rng.uniform(0.3, 1.0, A.size)
    fwd = prog.kernel.compile("numba")
    grad = prog.kernel_grad.compile("numba")
    for a, t in zip(A, dt):
        av, gv = fwd(a, t)
        with mpmath.workdps(50):
            want = {k: complex(f(mpmath.mpf(a), mpmath.mpf(t))).real for k, f in vals.items()}
            dwant = {k: complex(f(mpmath.mpf(a), mpmath.mpf(t))).real for k, f in refs.items()}
        # (1 + A dt cancels for A dt near -1: the scale is that of its terms)
        assert abs(av - want["Abar"]) <= 1e-14 * max(abs(want["Abar"]), 1.0)
        assert abs(gv - want["gain"]) <= 1e-14 * abs(want["gain"])
        got = dict(zip(prog.kernel_grad.output_names, grad(a, t, av)))
        for k, w in dwant.items():
            assert abs(got[k] - w) <= 1e-13 * max(abs(w), 1e-300), (method, k, a, got[k], w)
        # central differences (h relative), an independent check of the names' meaning
        for k, (var, out) in {"dAbar_dA": (0, 0), "dAbar_ddt": (1, 0), "dgain_dA": (0, 1),
                              "dgain_ddt": (1, 1)}.items():
            h = 1e-6 * max(abs((a, t)[var]), 1e-3)
            lo, hi = [a, t], [a, t]
            lo[var] -= h
            hi[var] += h
            fd = (fwd(*hi)[out] - fwd(*lo)[out]) / (2 * h)
            assert abs(got[k] - fd) <= 1e-6 * max(1.0, abs(fd)), (method, k, got[k], fd)


def test_torch_programs_have_finite_gradients_at_zero():
    """The shifted denominators keep the unused branch finite: no NaN through torch.where."""
    for method in disc.METHODS:
        fn = disc.discretizer("diag", method, "torch")
        for a in (torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.complex128)):
            a = a.requires_grad_()
            dt = torch.full((3,), 0.5, dtype=torch.float64, requires_grad=True)
            abar, bbar = fn(a, torch.ones_like(a), dt)
            (abar.abs().sum() + bbar.abs().sum()).backward()
            assert torch.isfinite(a.grad).all() and torch.isfinite(dt.grad).all(), method


def test_program_is_immutable_hashable_and_sympy_free():
    prog = disc.program("diag", "zoh")
    assert prog is disc.program("diag", "zoh")
    with pytest.raises(AttributeError):
        prog.real.name = "x"
    assert hash(prog.real) == hash(disc.program("diag", "zoh").real)
    for target in TARGETS:
        src = prog.real.source(target)
        assert "sympy" not in src and "Piecewise" not in src
    numba_src = prog.kernel.source("numba")
    assert "_exp(" in numba_src and "math.expm1(" in numba_src and " if " in numba_src
    assert "numpy.where(" in prog.real.source("numpy") and "torch.where(" in prog.real.source("torch")
    # the safe phi1: Taylor behind |z| < r, expm1(z) over a shifted z elsewhere
    assert "numpy.abs(t0) < 0.0001" in prog.real.source("numpy")


def test_a_backend_can_register_its_own_printer():
    table = dict(PRINTERS["numpy"].ops)
    table.update(exp=("tl.exp({0})", 100), expm1=("libdevice.expm1({0})", 100), where=("tl.where({0}, {1}, {2})", 100),
                 abs=("tl.abs({0})", 100))
    register_printer(Printer("toy", table, None))
    try:
        src = disc.program("diag", "zoh").real.source("toy")
        assert "tl.exp(" in src and "libdevice.expm1(" in src and "tl.where(" in src and "numpy" not in src
    finally:
        del PRINTERS["toy"]
    with pytest.raises(SeqcError, match="no scalar printer"):
        disc.program("diag", "zoh").real.source("toy")


def test_printer_parenthesises_by_precedence():
    prog = ScalarProgram("f", ("x", "y"), (), (
        ("o1", ("sub", ("in", "x"), ("sub", ("in", "y"), ("const", 1.0)))),
        ("o2", ("div", ("in", "x"), ("mul", ("in", "y"), ("in", "x")))),
        ("o3", ("neg", ("add", ("in", "x"), ("in", "y")))),
        ("o4", ("where", ("lt", ("in", "x"), ("in", "y")), ("where", ("lt", ("in", "y"), ("const", 0.0)),
                                                            ("in", "x"), ("in", "y")), ("const", -2.0))),
    ))
    x, y = 3.0, 5.0
    want = (x - (y - 1), x / (y * x), -(x + y), (x if y < 0 else y) if x < y else -2.0)
    for target in TARGETS:
        got = prog.compile(target)(*(np.float64(v) if target != "torch" else torch.tensor(v, dtype=torch.float64) for v in (x, y)))
        assert [float(g) for g in got] == pytest.approx(want, rel=0, abs=0), target
    assert math.isclose(prog.compile("numba")(2.0, 1.0)[3], -2.0)
    with pytest.raises(ValueError):
        ScalarProgram("bad", ("x",), (), (("o", ("pow", ("in", "x"))),))


def test_non_linear_bbar_has_no_kernel_form_but_still_runs():
    A, B, dt = disc.A, disc.B, disc.dt
    with disc.override("diag", "euler", 1 + A * dt, dt * B * B):
        prog = disc.program("diag", "euler")
        assert prog.kernel is None
        abar, bbar = disc.discretize(np.array([-1.0]), np.array([2.0]), 0.5, "euler")
        assert bbar[0] == pytest.approx(2.0)
