"""Memory estimates of a model, from its IR alone (nothing is allocated):
weights, and activations for one forward pass at a given batch and length.

``estimate(graph, batch, length, itemsize)`` counts every weight tensor, every
node's outputs, the per-step states a scan over the sequence may materialise
(length x state size per sequence) and attention's (heads, L, L) scores; the
result is an estimate for a forward pass without autograd, meant to refuse
what cannot fit (``seqc run``) and to show the order of magnitude
(``seqc check``, ``seqc explain``).  ``check_fits`` raises a ``SeqcError``
naming the limit (SEQC_MAX_MEMORY / ``--max-memory``) and how to raise it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import SeqcError
from .limits import limit


@dataclass(frozen=True)
class Estimate:
    weights: int          # bytes
    activations: int      # bytes
    batch: int
    length: int
    itemsize: int

    @property
    def total(self) -> int:
        return self.weights + self.activations

    def __str__(self) -> str:
        return (f"memory estimate (batch {self.batch}, length {self.length}, {8 * self.itemsize}-bit): weights "
                f"{human(self.weights)}, activations {human(self.activations)}, total {human(self.total)}")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"


def _sizes(graph, batch: int, length: int) -> dict[str, int]:
    """Values for the free size symbols: the first one met in the inputs is the batch,
    the second the length (the convention of ``seqc.inputs.random_inputs``)."""
    sizes: dict[str, int] = {}
    for nid in graph.inputs:
        for d in graph.nodes[nid].shape:
            for sym in sorted(getattr(d, "free_symbols", ()), key=str):
                if str(sym) not in sizes:
                    sizes[str(sym)] = batch if not sizes else length
    return sizes


def _numel(shape, subs, memo=None) -> int:
    n = 1
    for d in shape:
        if hasattr(d, "free_symbols") and d.free_symbols:
            value = None if memo is None else memo.get(d)
            if value is None:
                value = d.subs({s: subs.get(str(s), 1) for s in d.free_symbols})
                if memo is not None:
                    memo[d] = value
            d = value
        n *= max(0, int(d))
    return n


def estimate(graph, batch: int, length: int, itemsize: int = 4) -> Estimate:
    """Weights and forward activations of `graph` in bytes (see the module docstring)."""
    subs = _sizes(graph, batch, length)
    memo: dict = {}                 # symbolic dimension -> its value (a deep model repeats a few)
    weights = sum(math.prod(s) for s in graph.weight_shapes().values()) * itemsize
    acts = 0
    for n in graph.nodes.values():
        for shape in n.shapes:
            acts += _numel(shape, subs, memo)
        spec = n.spec
        if spec is None:
            continue
        if n.op == "attention":
            heads = int(n.attrs.get("heads", 1) or 1)
            acts += batch * heads * length * length
        elif getattr(spec, "stateful", False) and spec.state is not None:
            try:
                states = spec.state(list(n.input_shapes), n.attrs)
            except Exception:  # noqa: BLE001 - an estimate: a rule that needs more is skipped
                states = {}
            for s in states.values():
                if all(int(d) > 0 for d in s):
                    acts += batch * length * math.prod(int(d) for d in s)
    return Estimate(int(weights), int(acts * itemsize), batch, length, itemsize)


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(est: Estimate, max_bytes: int | None = None, flag: str | None = "--max-memory") -> None:
    """Refuse (SeqcError) an estimate above the limit or above the machine's memory."""
    most = limit("SEQC_MAX_MEMORY") if max_bytes is None else max_bytes
    if est.total > most:
        raise SeqcError(f"this run needs about {human(est.total)} (weights {human(est.weights)}, activations "
                        f"{human(est.activations)} at batch {est.batch}, length {est.length}), more than the limit "
                        f"of {human(most)}; raise it with {flag + ' BYTES or ' if flag else ''}SEQC_MAX_MEMORY, or use "
                        f"smaller sizes")
    phys = physical_memory()
    if phys is not None and est.total > phys:
        raise SeqcError(f"this run needs about {human(est.total)}, more than this machine's memory "
                        f"({human(phys)}); use smaller sizes")
