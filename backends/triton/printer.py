"""The Triton printer: the scalar programs of a discretization -> ``@triton.jit`` functions.

Owns the Triton spelling of the scalar ops (``OPS``, registered as the
``"triton"`` table of ``seqc.scalar``) and the two jit functions every scan
kernel calls:

* ``_disc(A, dt) -> a, g``: ``a = Abar(A, dt)`` and the gain ``g`` with
  ``Bbar = g * B``, for real ``A`` -- the ``kernel`` program of the
  ``DiscProgram`` the ``discretize`` pass stored on the call;
* ``_disc_grad(A, dt) -> a, g, a_A, a_dt, g_A, g_dt``: the same plus their
  partial derivatives -- the ``kernel_grad`` program (derived in
  ``seqc.discretization`` from the same sympy derivation, with ``exp(A dt)``
  read back from ``a``).

No sympy here: the derivation is lowered once by ``seqc.discretization``
(common subexpressions, the safe ``phi1`` / ``phi2`` forms behind a
``where``) and only printed.  ``expm1`` is the generated module's ``_expm1``
helper (``libdevice.expm1`` on a GPU, Kahan's formula on the interpreter).
"""
from __future__ import annotations

from seqc.errors import SeqcError
from seqc.scalar import Printer, register_printer

# op -> (Triton format, precedence); the whole target-specific surface of the printer.
OPS = {
    "add": ("{0} + {1}", 20),
    "sub": ("{0} - {1}", 20),
    "mul": ("{0} * {1}", 30),
    "div": ("{0} / {1}", 30),
    "neg": ("-{0}", 50),
    "lt": ("{0} < {1}", 10),
    "exp": ("tl.exp({0})", 100),
    "expm1": ("_expm1({0})", 100),
    "cos": ("tl.cos({0})", 100),
    "sin": ("tl.sin({0})", 100),
    "abs": ("tl.abs({0})", 100),
    "where": ("tl.where({0}, {1}, {2})", 100),
}

TRITON = Printer("triton", OPS)
register_printer(TRITON)

# kernel argument spelling of the programs' inputs
_NAMES = {"A_re": "A", "dt": "dt"}
GRAD_OUTPUTS = ("dAbar_dA", "dAbar_ddt", "dgain_dA", "dgain_ddt")


def kernel_programs(disc):
    """The (forward, derivative) scalar programs of a DiscProgram; SeqcError when the fused kernels
    cannot take it (Bbar not gain(A, dt) * B, or not a diagonal system)."""
    if disc is None or disc.structure != "diag" or disc.kernel is None or disc.kernel_grad is None:
        what = "no discretization" if disc is None else f"the {disc.structure} {disc.method} discretization"
        raise SeqcError(f"the Triton scan kernels cannot take {what} (they need a diagonal "
                        f"Bbar = gain(A, dt) * B)")
    return disc.kernel, disc.kernel_grad


def _broadcast(expr: str, like: str) -> str:
    """A constant output spread to the tile shape (a bare float cannot be summed over an axis)."""
    try:
        float(expr)
    except ValueError:
        return expr
    return f"tl.zeros_like({like}) + {expr}"


def disc_functions(disc) -> str:
    """``_disc`` and ``_disc_grad`` of a DiscProgram, printed with the Triton table."""
    fwd, grad = kernel_programs(disc)
    lines, outs = fwd.inline("triton", _NAMES, prefix="_f")
    a, g = outs["Abar"], outs["gain"]
    head = [f"# {disc.form}"]
    body = ["@triton.jit", "def _disc(A, dt):", *(f"    {ln}" for ln in lines),
            f"    _a = {a}", f"    _g = {g}", "    return _a, _g"]
    glines, gouts = grad.inline("triton", {**_NAMES, "Abar": "_a"}, prefix="_d")
    derivs = [_broadcast(gouts[k], "_a") for k in GRAD_OUTPUTS]
    body += ["", "", "@triton.jit", "def _disc_grad(A, dt):", "    _a, _g = _disc(A, dt)",
             *(f"    {ln}" for ln in glines),
             *(f"    _{k} = {e}" for k, e in zip(GRAD_OUTPUTS, derivs)),
             f"    return _a, _g, {', '.join('_' + k for k in GRAD_OUTPUTS)}"]
    return "\n".join(head + body) + "\n"
