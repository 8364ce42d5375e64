"""Attach each state-space node's discretization: ``meta["disc"]`` is the
lowered, sympy-free program (``seqc.discretization.DiscProgram``: scalar
programs that every backend prints and compiles once, at build time) and
``meta["disc_form"]`` its one-line form for IR dumps."""
from __future__ import annotations

from .. import discretization
from .manager import compiler_pass


def structure_and_method(node):
    """(structure, method) of a continuous-time node (its op's ``discretization`` trait),
    or None (not continuous-time, or the shift SSM)."""
    rule = node.spec.traits.discretization if node.spec is not None else None
    return rule(node) if rule is not None else None


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
