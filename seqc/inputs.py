"""Model inputs, in one place for every backend and tool: the declared inputs of
a graph, checking actual arrays/tensors against them (symbolic dimensions bound
consistently across inputs), and seeded random inputs for run / difftest / bench."""
from __future__ import annotations

import numpy as np

from .errors import SeqcError


def declared_inputs(graph) -> list[tuple]:
    """[(name, shape, dtype)] of the graph's inputs, in order."""
    return [(graph.nodes[i].attrs["name"], graph.nodes[i].shape, graph.nodes[i].dtype) for i in graph.inputs]


def _kind(dtype) -> str:
    """'c' complex, 'b' bool, 'i' integer, 'f' floating, for torch and NumPy dtypes."""
    if hasattr(dtype, "is_floating_point"):          # torch
        if dtype.is_complex:
            return "c"
        if dtype.is_floating_point:
            return "f"
        return "b" if str(dtype) == "torch.bool" else "i"
    k = np.dtype(dtype).kind
    return {"u": "i"}.get(k, k)


def _is_int(dtype) -> bool:
    if hasattr(dtype, "is_floating_point"):          # torch
        return not (dtype.is_floating_point or dtype.is_complex)
    return np.dtype(dtype).kind in "iub"


def check_inputs(declared, xs, step: bool = False) -> None:
    """Each input matches its declaration; a symbol (B, L, ...) has one size everywhere.
    With ``step=True`` the length dimension (the second) is absent."""
    if len(xs) != len(declared):
        raise SeqcError(f"the model takes {len(declared)} input(s), got {len(xs)}")
    bound = {}
    for x, (name, shape, dtype) in zip(xs, declared):
        dims = (tuple(shape[:1]) + tuple(shape[2:])) if step else tuple(shape)
        got = tuple(x.shape)
        if len(got) != len(dims):
            raise SeqcError(f"input '{name}' must have {len(dims)} dimensions [{', '.join(map(str, dims))}], "
                            f"got shape {got}")
        for i, (d, n) in enumerate(zip(dims, got)):
            if getattr(d, "is_number", True):
                if int(d) != n:
                    raise SeqcError(f"input '{name}': dimension {i} must be {d}, got {n}")
            elif bound.setdefault(str(d), n) != n:
                raise SeqcError(f"input '{name}': dimension {i} ({d}) is {n}, but {d} = {bound[str(d)]} "
                                f"in an earlier input")
        kind = _kind(x.dtype)
        if kind == "c":
            raise SeqcError(f"input '{name}' is complex ({x.dtype}); seqc models take real inputs (pass the real "
                            f"and imaginary parts as separate features if you mean both)")
        if kind == "b":
            raise SeqcError(f"input '{name}' holds booleans; it takes "
                            f"{'integer tokens' if dtype == 'int' else 'float values'}")
        if kind not in "if":
            raise SeqcError(f"input '{name}' has element type {x.dtype}, not numbers")
        if (dtype == "int") != _is_int(x.dtype):
            want = "integer tokens" if dtype == "int" else "float values"
            raise SeqcError(f"input '{name}' takes {want}, got {x.dtype}")


def random_inputs(graph, batch: int, length: int, rng) -> list[np.ndarray]:
    """Seeded inputs: the first symbolic dimension is the batch, the second the
    length; float inputs are standard normal, token inputs uniform over the
    smallest vocabulary that reads them."""
    xs, sizes = [], {}
    for nid in graph.inputs:
        n = graph.nodes[nid]
        shape = []
        for i, d in enumerate(n.shape):
            if getattr(d, "is_number", True):
                shape.append(int(d))
                continue
            if not getattr(d, "is_Symbol", False):
                raise SeqcError(f"input '{n.attrs['name']}': cannot choose a size for the dimension expression {d}")
            if str(d) not in sizes:
                if len(sizes) >= 2:
                    raise SeqcError(f"input '{n.attrs['name']}' has a third symbolic dimension '{d}'; "
                                    f"only the batch and length dimensions can be chosen")
                sizes[str(d)] = batch if not sizes else length
            shape.append(sizes[str(d)])
        if n.dtype == "int":
            vocab = min((u.attrs["vocab"] for u in graph.users(nid) if u.op == "embedding"), default=2)
            xs.append(rng.integers(0, vocab, size=tuple(shape)))
        else:
            xs.append(rng.standard_normal(tuple(shape)))
    return xs


def as_list(out) -> list:
    """A model's result as a list of outputs (models may return several)."""
    return list(out) if isinstance(out, (tuple, list)) else [out]
