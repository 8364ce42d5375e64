"""Attach each state-space node's discretization: the structure (diagonal or
dense) and method, and the sympy-derived forms that backends lower through
code printers (``seqc.discretization``)."""
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
    """Derive Abar, Bbar symbolically for every continuous-time node (ssm, selective_ssm)."""
    for n in g.order():
        sm = structure_and_method(n)
        if sm is None:
            continue
        n.meta["disc_form"] = discretization.describe(*sm)
    return g
