"""Fusion: fold the elementwise work around convolutions and scans into them
(pattern rewrites, applied to a fixed point), then record fusion regions in the
IR - each anchor (scan, convolution) with the epilogue it performs - which the
Triton backend turns into single kernels and the torch backend into single
functions."""
from __future__ import annotations

from ..ir import Ref
from ..lower import Region
from ..registry import OPS
from .manager import compiler_pass

ACTS = {"silu", "gelu", "relu", "softplus", "sigmoid", "tanh"}


def _single_use(g, ref: Ref) -> bool:
    users = g.users(ref.node)
    uses = sum(r == ref for u in users for r in u.inputs) + sum(r == ref for r in g.outputs)
    return uses == 1 and len(g.nodes[ref.node].shapes) == 1


def _act_into_conv(g, n):
    """act(conv1d[activation=identity](x)) -> conv1d[activation=act](x)."""
    if n.op not in ACTS:
        return False
    src = g.nodes[n.inputs[0].node]
    if src.op != "conv1d" or src.attrs["activation"] != "identity" or not _single_use(g, n.inputs[0]):
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
        if act.op in ACTS and _single_use(g, n.inputs[b]):
            n.op = "gate"
            n.attrs = {"act": act.op}
            g.set_inputs(n, (n.inputs[a], act.inputs[0]))
            if not g.users(act.id):
                g.remove(act.id)
            return True
    return False


def _gate_into_scan(g, n):
    """gate[silu](selective_ssm(u, ...), z) -> selective_ssm(u, ..., z)."""
    if n.op != "gate" or n.attrs.get("act") != "silu":
        return False
    scan = g.nodes[n.inputs[0].node]
    z = n.inputs[1]
    if scan.op != "selective_ssm" or len(scan.inputs) != 4 or not _single_use(g, n.inputs[0]) or z.node >= scan.id:
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
    if n.op == "selective_ssm":
        parts = []
        if n.attrs["delta_bias"]:
            parts.append("delta+bias")
        if n.attrs["delta_softplus"]:
            parts.append("softplus(delta)")
        parts += [f"discretize[{n.attrs['disc']}]", "scan", "C-contraction", "D-skip"]
        if len(n.inputs) == 5:
            parts.append("silu(z)-gate")
        return parts
    if n.op == "ssm":
        return [f"discretize[{n.attrs['disc']}]", "kernel/scan", "D-skip"]
    if n.op == "conv1d":
        return ["causal-conv", "bias"] + ([n.attrs["activation"]] if n.attrs["activation"] != "identity" else [])
    return []


def region_flags(n) -> dict:
    """The kernel specialisation constants of an anchor: what its one fused kernel does."""
    a = n.attrs
    if n.op == "selective_ssm":
        return {"delta_bias": bool(a["delta_bias"]), "delta_softplus": bool(a["delta_softplus"]), "disc": a["disc"],
                "d_skip": True, "gate": "silu" if len(n.inputs) == 5 else None}
    if n.op == "ssm":
        return {"kind": a["kind"], "disc": a["disc"], "d_skip": True}
    if n.op == "conv1d":
        return {"bias": bool(a.get("bias", True)), "activation": a["activation"]}
    return {}


@compiler_pass("mark-fusion-regions")
def mark_fusion_regions(g, ctx):
    """Record one fusion region per anchor: the anchor plus single-use elementwise consumers."""
    k = 0
    for n in g.order():
        if n.op not in ("selective_ssm", "ssm", "conv1d"):
            continue
        rid = f"f{k}"
        k += 1
        n.meta["fusion"] = rid
        n.meta["fused"] = "+".join(epilogue(n))
        members = [n]
        cur = n
        while len(cur.shapes) == 1 and _single_use(g, Ref(cur.id)):
            (nxt,) = [u for u in g.users(cur.id)] or [None]
            if nxt is None or OPS[nxt.op].kind not in ("activation", "elementwise") or "fusion" in nxt.meta:
                break
            nxt.meta["fusion"] = rid
            members.append(nxt)
            cur = nxt
        ids = {m.id for m in members}
        inputs = tuple(dict.fromkeys(r for m in members for r in m.inputs if r.node not in ids))
        n.meta["region"] = Region(rid, n.id, tuple(m.id for m in members), (), tuple(m.id for m in members[1:]),
                                  inputs, tuple(Ref(cur.id, i) for i in range(len(cur.shapes))), region_flags(n))
    return g
