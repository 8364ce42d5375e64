"""The fused CPU selective-scan kernels: bias, softplus, the D skip and the silu gate
generated into the numba kernels from the region's flags.  Checked against the torch
engine (``SEQC_NO_NUMBA=1``: the same pieces as torch ops), against the NumPy oracle
of ``selective_ssm`` and by gradcheck, for flag combinations that exercise every
prologue/epilogue branch; plus the activation programs against torch and the
generated source's dependence on the flags."""
import importlib.util
import itertools
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seqc import discretization
from seqc.backends.torch import cpu_kernels, scan
from seqc.ops import lookup

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="no numba")

# (delta_bias, delta_softplus, d_skip, gate): all 16 are checked against the torch engine;
# gradcheck runs on the extremes and two mixed ones.
# Each combination is a separately compiled kernel pair (~10 s of numba compilation on a cold cache), so
# CI checks each flag on and off (the extremes and the one-flag-off / one-flag-on patterns); set
# SEQC_FULL_TESTS=1 for all 16.
ALL_COMBOS = list(itertools.product([False, True], repeat=4))
COMBOS = ALL_COMBOS if os.environ.get("SEQC_FULL_TESTS") == "1" else [
    (False, False, False, False), (True, True, True, True), (True, False, True, False), (False, True, False, True),
    (True, True, False, False), (False, False, True, True)]
GRADCHECK = [(False, False, False, False), (True, True, True, True), (True, False, False, True),
             (False, True, True, False)]


def inputs(flags, b=2, L=11, d=32, n=4, seed=0):
    bias, softplus, d_skip, gate = flags
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = dict(u=r(b, L, d), delta=r(b, L, d) * 2, A=-torch.exp(r(d, n) * 0.5), B=r(b, L, n), C=r(b, L, n),
                state=r(b, d, n))
    if softplus:
        args["delta"][0, 0, :4] = torch.tensor([25.0, 19.5, -30.0, 21.0])   # both sides of softplus' threshold
    else:
        args["delta"] = args["delta"].abs() + 1.0          # a stable recurrence without softplus
    args.update(D=r(d) if d_skip else None, z=r(b, L, d) * 3 if gate else None,
                delta_bias=r(d) * 0.3 if bias else None)
    return args, softplus


def run(monkeypatch, engine, args, softplus, chunk=4):
    monkeypatch.setenv("SEQC_NO_NUMBA", "0" if engine == "numba" else "1")
    leaves = {k: (None if v is None else v.detach().clone().requires_grad_()) for k, v in args.items()}
    y, x = scan.selective_scan(**leaves, delta_softplus=softplus, return_state=True, chunk=chunk)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    ((y * w).sum() + (x * x).sum()).backward()
    return y.detach(), x.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


@needs_numba
@pytest.mark.parametrize("flags", COMBOS, ids=lambda f: "".join("bsdg"[i] if v else "-" for i, v in enumerate(f)))
def test_fused_matches_torch_engine(monkeypatch, flags):
    args, softplus = inputs(flags)
    monkeypatch.setenv("SEQC_NO_NUMBA", "0")
    assert isinstance(scan._pick_engine(args["u"], "mamba", None, dict(zip(cpu_kernels.FLAGS, flags))),
                      scan._NumbaEngine)
    y1, x1, g1 = run(monkeypatch, "numba", args, softplus)
    y2, x2, g2 = run(monkeypatch, "torch", args, softplus)
    assert (y1 - y2).abs().max() < 1e-12 and (x1 - x2).abs().max() < 1e-12
    assert g1.keys() == g2.keys()
    for k in g1:
        scale = max(1.0, g2[k].abs().max().item())
        assert (g1[k] - g2[k]).abs().max() < 1e-11 * scale, k


@needs_numba
@pytest.mark.parametrize("flags", [(True, True, True, True), (False, False, True, False)])
def test_fused_matches_numpy_oracle(monkeypatch, flags):
    """The oracle always has the D skip; without a d_skip flag the kernel adds none, so the
    oracle's D*u is subtracted."""
    bias, softplus, d_skip, gate = flags
    args, _ = inputs(flags)
    monkeypatch.setenv("SEQC_NO_NUMBA", "0")
    y, x = scan.selective_scan(**args, delta_softplus=softplus, return_state=True, chunk=4)
    d = args["u"].shape[2]
    p = {"A_log": np.log(-args["A"].numpy()), "D": args["D"].numpy() if d_skip else np.zeros(d),
         "delta_bias": args["delta_bias"].numpy() if bias else np.zeros(d)}
    spec = lookup("selective_ssm")
    ref_y, ref_state = spec.reference(args["u"].numpy(), args["delta"].numpy(), args["B"].numpy(),
                                      args["C"].numpy(), *([args["z"].numpy()] if gate else []), p=p,
                                      state={"x": args["state"].numpy()}, delta_bias=bias,
                                      delta_softplus=softplus, disc="mamba", d_state=args["A"].shape[1],
                                      d_model=d)
    assert np.abs(y.numpy() - ref_y).max() < 1e-10
    assert np.abs(x.numpy() - ref_state["x"]).max() < 1e-10


@needs_numba
@pytest.mark.parametrize("flags", GRADCHECK, ids=lambda f: "".join("bsdg"[i] if v else "-" for i, v in enumerate(f)))
def test_fused_gradcheck(monkeypatch, flags):
    monkeypatch.setenv("SEQC_NO_NUMBA", "0")
    args, softplus = inputs(flags, b=1, L=6, d=16, n=2)
    names = [k for k, v in args.items() if v is not None]
    vals = [args[k].detach().clone().requires_grad_() for k in names]

    def f(*v):
        kw = dict(zip(names, v))
        return scan.selective_scan(**kw, delta_softplus=softplus, return_state=True, chunk=4)

    assert torch.autograd.gradcheck(f, vals, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_activation_programs_match_torch():
    x = torch.linspace(-60, 60, 4801, dtype=torch.float64, requires_grad=True)
    for name, fn in (("softplus", F.softplus), ("silu", F.silu)):
        f, df = discretization.activation_program(name).compile("torch")(x.detach())
        y = fn(x)
        (grad,) = torch.autograd.grad(y.sum(), x)
        assert (f - y.detach()).abs().max() < 1e-14 and (df - grad).abs().max() < 1e-15, name


def test_flags_change_generated_source():
    program = discretization.program("diag", "mamba")
    sources = {flags: cpu_kernels.generate(program, False, flags) for flags in ALL_COMBOS}
    assert len(set(sources.values())) == len(ALL_COMBOS)
    off, on = sources[(False,) * 4], sources[(True,) * 4]
    assert "log1p(" not in off and "bias[k, j]" not in off and "dz" not in off.split("def bwd")[1].split(":")[1:][0]
    assert "_log1p(" in on and "math.log1p" not in on and "dbias[b, k, j] += s_a[j]" in on and "dzt[j] =" in on
    assert "Dv[k, j] * ut[j]" in on and "Dv[k, j]" not in off.replace("Dv, z, bias", "")
    # the layer's flags come from the region
    region = type("R", (), {"flags": {"delta_bias": False, "delta_softplus": True, "disc": "zoh",
                                      "d_skip": True, "gate": None}})()
    assert scan.kernel_flags({"delta_bias": True}, region, gate=True)["gate"] is None
    with pytest.raises(ValueError):
        cpu_kernels.normalise_flags({"gate": "gelu"})


@needs_numba
@pytest.mark.parametrize("flags", [(True, True, True, True), (False, False, False, False)],
                         ids=lambda f: "".join("bsdg"[i] if v else "-" for i, v in enumerate(f)))
def test_fused_custom_op_passes_opcheck(monkeypatch, flags):
    """The custom op torch.compile traces (``seqc::selective_scan_fused``: schema, fake shapes
    and strides, autograd registration, absent optional inputs) checked by
    torch.library.opcheck; its values and gradients equal to the eager path's."""
    monkeypatch.setenv("SEQC_NO_NUMBA", "0")
    args, softplus = inputs(flags, b=2, L=9, d=16, n=2)
    tensors = [None if args[k] is None else args[k].requires_grad_() for k in
               ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "state")]
    key = scan.program_key(scan._resolve("mamba"))
    options = (key, softplus, 4)
    torch.library.opcheck(scan.FUSED_SCAN._op, (*tensors, *options))
    out = scan.FUSED_SCAN._op(*tensors, *options)[:2]
    ref = scan.FUSED_SCAN(*tensors, *options)
    present = [t for t in tensors if t is not None]
    for a, r in zip(out, ref):
        assert torch.equal(a, r)
    g1 = torch.autograd.grad(out[0].sum() + out[1].square().sum(), present)
    g2 = torch.autograd.grad(ref[0].sum() + ref[1].square().sum(), present)
    for a, r in zip(g1, g2):
        assert torch.equal(a, r)
