"""Clean-up passes: fold identity ops, eliminate dead nodes, share identical
sub-expressions.  Layers that own weights are never removed, so a checkpoint's
keys do not depend on which passes ran."""
from __future__ import annotations

from ..ir import Ref
from .manager import compiler_pass


def _identity_input(n):
    """The input a node merely forwards (its op's ``identity`` trait), or None."""
    identity = n.spec.traits.identity if n.spec is not None else None
    return identity(n) if identity is not None else None


@compiler_pass("fold-identities")
def fold_identities(g, ctx):
    """Remove ops that forward their input unchanged (dropout p=0, one-way split/concat)."""
    for n in list(g.order()):
        src = _identity_input(n)
        if src is not None:
            g.replace_uses(Ref(n.id, 0), src)
            g.remove(n.id)
    return g


@compiler_pass("eliminate-dead-code")
def eliminate_dead_code(g, ctx):
    """Drop weightless nodes whose results reach no output."""
    live = set()
    work = [r.node for r in g.outputs] + list(g.inputs)
    while work:
        i = work.pop()
        if i in live:
            continue
        live.add(i)
        work.extend(r.node for r in g.nodes[i].inputs)
    for n in reversed(g.order()):
        if n.id in live or n.op == "input":
            continue
        if n.spec.is_layer:
            # keep weight-owning layers (their keys stay loadable) and what they read
            continue
        if not g.users(n.id):
            g.remove(n.id)
    return g


@compiler_pass("share-subexpressions")
def share_subexpressions(g, ctx):
    """Merge weightless nodes that apply the same op to the same inputs."""
    seen = {}
    for n in list(g.order()):
        if n.op == "input" or n.spec.is_layer:
            continue
        key = (n.op, n.inputs, repr(sorted(n.attrs.items())))
        if key in seen:
            first = seen[key]
            for i in range(len(n.shapes)):
                g.replace_uses(Ref(n.id, i), Ref(first, i))
            g.remove(n.id)
        else:
            seen[key] = n.id
    return g
