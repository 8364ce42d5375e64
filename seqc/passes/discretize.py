"""Attach each state-space node's discretization: ``meta["disc"]`` is the
lowered, sympy-free program (``seqc.discretization.DiscProgram``: scalar
programs that every backend prints and compiles once, at build time) and
``meta["disc_form"]`` its one-line form for IR dumps."""
from __future__ import annotations

from .. import discretization
from .manager import compiler_pass


def structure_and_method(node):
    """(structure, method) of an ssm / selective_ssm node, or None (shift SSM)."""
    if node.op == "selective_ssm":
        return "diag", node.attrs["disc"]
    if node.op == "ssm":
        kind = node.attrs["kind"]
        if kind == "shift":
            return None
        return ("dense" if kind == "dense" else "diag"), node.attrs["disc"]
    return None


@compiler_pass("discretize")
def discretize(g, ctx):
    """Derive Abar, Bbar symbolically for every ssm / selective_ssm node and lower them."""
    for n in g.order():
        sm = structure_and_method(n)
        if sm is None:
            continue
        program = discretization.program(*sm)
        n.meta["disc"] = program
        n.meta["disc_form"] = program.form
    return g
