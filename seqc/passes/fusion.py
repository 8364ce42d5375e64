"""Fusion: fold the elementwise work around convolutions and scans into them
(pattern rewrites, applied to a fixed point), then record fusion regions in the
IR - each anchor (scan, convolution) with the epilogue it performs - which the
Triton backend turns into single kernels and the torch backend into single
functions."""
from __future__ import annotations

from ..ir import Ref
from ..lower import Region
from .manager import compiler_pass


def _traits(n):
    return n.spec.traits if n.spec is not None else None


def _is_activation(n) -> bool:
    t = _traits(n)
    return t is not None and t.activation


def _single_use(g, ref: Ref) -> bool:
    users = g.users(ref.node)
    uses = sum(r == ref for u in users for r in u.inputs) + sum(r == ref for r in g.outputs)
    return uses == 1 and len(g.nodes[ref.node].shapes) == 1


def _act_into_conv(g, n):
    """act(conv1d[activation=identity](x)) -> conv1d[activation=act](x) (any op that accepts an activation)."""
    if not _is_activation(n):
        return False
    src = g.nodes[n.inputs[0].node]
    if not (_traits(src) and _traits(src).accepts_activation) or src.attrs["activation"] != "identity" \
            or not _single_use(g, n.inputs[0]):
        return False
    src.attrs["activation"] = n.op
    g.replace_uses(Ref(n.id), Ref(src.id))
    g.remove(n.id)
    return True


def _mul_act_into_gate(g, n):
    """mul(x, act(g)) -> gate[act](x, g)."""
    if n.op != "mul":
        return False
    for a, b in ((0, 1), (1, 0)):
        act = g.nodes[n.inputs[b].node]
        if _is_activation(act) and _single_use(g, n.inputs[b]):
            n.op = "gate"
            n.attrs = {"act": act.op}
            g.set_inputs(n, (n.inputs[a], act.inputs[0]))
            if not g.users(act.id):
                g.remove(act.id)
            return True
    return False


def _gate_into_scan(g, n):
    """gate[silu](selective_ssm(u, ...), z) -> selective_ssm(u, ..., z) (any op that accepts a gate)."""
    if n.op != "gate" or n.attrs.get("act") != "silu":
        return False
    scan = g.nodes[n.inputs[0].node]
    z = n.inputs[1]
    if not (_traits(scan) and _traits(scan).accepts_gate) or len(scan.inputs) != len(scan.spec.inputs) - 1 \
            or not _single_use(g, n.inputs[0]) or z.node >= scan.id:
        return False
    g.set_inputs(scan, scan.inputs + (z,))
    g.replace_uses(Ref(n.id), Ref(scan.id))
    g.remove(n.id)
    return True


REWRITES = (_act_into_conv, _mul_act_into_gate, _gate_into_scan)


@compiler_pass("fuse-elementwise")
def fuse_elementwise(g, ctx):
    """Rewrite act(conv1d) and y*silu(z) patterns into the layers that can do them."""
    changed = True
    while changed:
        changed = False
        for n in list(g.order()):
            if n.id in g.nodes and any(rule(g, n) for rule in REWRITES):
                changed = True
    return g


def epilogue(n) -> list[str]:
    """The elementwise work a fused anchor performs inside its one kernel."""
    t = _traits(n)
    return list(t.fused(n)) if t is not None and t.fused is not None else []


def region_flags(n) -> dict:
    """The kernel specialisation constants of an anchor, read from its traits and attributes:
    a discretized scan's kind / delta handling / method and D skip, the gate of an op that
    accepts one (present when its optional ``z`` input is), a convolution's bias and activation.
    An op may supply its own with a ``region_flags(node)`` trait."""
    t, a = _traits(n), n.attrs
    own = getattr(t, "region_flags", None)
    if callable(own):
        return dict(own(n))
    flags = {}
    if t.discretization is not None:
        flags.update({k: a[k] for k in ("kind",) if k in a})
        flags.update({k: bool(a[k]) for k in ("delta_bias", "delta_softplus") if k in a})
        flags.update(disc=a["disc"], d_skip=True)
    if t.accepts_gate:
        required = len(n.spec.inputs) - len(n.spec.optional_inputs)
        flags["gate"] = "silu" if len(n.inputs) > required else None
    if t.accepts_activation:
        flags.update(bias=bool(a.get("bias", False)), activation=a["activation"])
    return flags


@compiler_pass("mark-fusion-regions")
def mark_fusion_regions(g, ctx):
    """Record one fusion region per anchor: the anchor plus single-use elementwise consumers."""
    k = 0
    for n in g.order():
        if not (_traits(n) and _traits(n).anchor):
            continue
        rid = f"f{k}"
        k += 1
        n.meta["fusion"] = rid
        n.meta["fused"] = "+".join(epilogue(n))
        members = [n]
        cur = n
        while len(cur.shapes) == 1 and _single_use(g, Ref(cur.id)):
            (nxt,) = [u for u in g.users(cur.id)] or [None]
            if nxt is None or not _traits(nxt).epilogue_ok or "fusion" in nxt.meta:
                break
            nxt.meta["fusion"] = rid
            members.append(nxt)
            cur = nxt
        ids = {m.id for m in members}
        inputs = tuple(dict.fromkeys(r for m in members for r in m.inputs if r.node not in ids))
        n.meta["region"] = Region(rid, n.id, tuple(m.id for m in members), (), tuple(m.id for m in members[1:]),
                                  inputs, tuple(Ref(cur.id, i) for i in range(len(cur.shapes))), region_flags(n))
    return g
