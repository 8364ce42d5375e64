"""Shared source generation: the function skeletons (forward over a sequence,
init_state, step over one token) written once for every backend.

A backend supplies a ``Renderer`` that spells a single call; everything else -
argument lists, state plumbing, returns - is here.  Generated source contains
only identifiers this compiler produced and literals it validated, and is
registered with ``linecache`` so tracebacks show the generated lines.
"""
from __future__ import annotations

import linecache
from typing import Any

from .cache import Recent, text_digest
from .lower import Call, Program


def literal(v: Any) -> str:
    """A validated attribute value as Python source (numbers, bools, strings, lists)."""
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        if not all(c.isalnum() or c in "-_." for c in v):
            raise AssertionError(f"refusing to emit string {v!r}")
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(literal(x) for x in v) + "]"
    raise AssertionError(f"cannot emit {v!r}")


def kwargs(attrs: dict) -> str:
    return ", ".join(f"{k}={literal(v)}" for k, v in sorted(attrs.items()))


class Renderer:
    """How one backend spells a call.  Subclasses override these methods."""

    header: str = ""
    self_arg: str = ""            # "self, " for methods
    weights_arg: str = ""         # ", W" for functions taking weights

    def prologue(self, program: Program) -> list[str]:
        return []

    def checks(self, program: Program, step: bool) -> list[str]:
        """Lines run first in forward / step (e.g. input validation)."""
        return []

    def init_checks(self, program: Program) -> list[str]:
        """Lines run first in init_state (e.g. the batch's validation)."""
        return []

    def call(self, c: Call, state_in: str | None, step: bool) -> str:
        raise NotImplementedError

    def init_state(self, c: Call) -> str:
        raise NotImplementedError


def _assign(c: Call) -> str:
    return ", ".join(c.outs) if len(c.outs) > 1 else c.outs[0]


def _line(r: Renderer, c: Call, state_in: str, step: bool) -> str:
    """One call as a statement; a stateful call also stores its new state in S_out."""
    if c.stateful:
        key = repr(c.state_key)
        line = f"{_assign(c)}, S_out[{key}] = {r.call(c, state_in.format(key), step=step)}"
    else:
        line = f"{_assign(c)} = {r.call(c, None, step=step)}"
    return line + (f"  # {c.name}" if c.name else "")


def generate(program: Program, r: Renderer, trace: bool = False) -> str:
    """Source of forward / init_state / step for `program` in the renderer's spelling.

    With ``trace=True`` only a ``forward_traced(..., trace, hook)`` is generated,
    which also stores every node's result in ``trace[node_id]`` (for difftest);
    ``hook(node_id, value)``, when given, may replace a result as it is computed
    (difftest's fault injection).  A fusion region's calls are marked by comments."""
    ins = ", ".join(program.inputs)
    lines = [r.header] if r.header else []
    ind = "    " if r.self_arg else ""

    def emit(s=""):
        lines.append(ind + s if s else "")

    prologue = r.prologue(program)
    outs = ", ".join(program.outputs)
    ret = outs if len(program.outputs) == 1 else f"({outs},)"

    # forward over a whole sequence
    fname = "forward_traced" if trace else "forward"
    extra = ", trace=None, hook=None" if trace else ""
    emit(f"def {fname}({r.self_arg}{ins}{r.weights_arg}, state=None, return_state=False, lengths=None{extra}):")
    for line in r.checks(program, step=False):
        emit("    " + line)
    emit("    S = {} if state is None else state")
    emit("    S_out = {}")
    for p in prologue:
        emit("    " + p)
    for c in program.calls:
        if c.region is not None:
            emit(f"    # region {c.region.id}: {c.op} + {len(c.region.epilogue)} epilogue op(s)")
        emit("    " + _line(r, c, "S.get({})", step=False))
        if trace:
            value = _assign(c) if len(c.outs) == 1 else "(" + _assign(c) + ",)"
            emit("    if hook is not None:")
            emit(f"        {_assign(c)} = hook({c.node}, {value})")
            emit(f"    trace[{c.node}] = {value}")
    emit(f"    return ({ret}, S_out) if return_state else {ret}")
    emit()
    if trace:
        return "\n".join(lines) + "\n"

    # a fresh recurrent state
    emit(f"def init_state({r.self_arg}batch{r.weights_arg}):")
    for line in r.init_checks(program):
        emit("    " + line)
    for p in prologue:
        emit("    " + p)
    emit("    return {")
    for c in program.stateful_calls():
        emit(f"        {c.state_key!r}: {r.init_state(c)},")
    emit("    }")
    emit()

    # one token
    step_ins = ", ".join(f"{v}" for v in program.inputs)
    emit(f"def step({r.self_arg}{step_ins}{r.weights_arg}, state=None):")
    for line in r.checks(program, step=True):
        emit("    " + line)
    first = program.inputs[0]
    emit("    if state is None:")
    emit(f"        state = {r.self_arg and 'self.'}init_state({first}.shape[0]{r.weights_arg})")
    emit("    S_out = {}")
    for p in prologue:
        emit("    " + p)
    for c in program.calls:
        emit("    " + _line(r, c, "state[{}]", step=True))
    emit(f"    return {ret}, S_out")
    return "\n".join(lines) + "\n"


_counter = [0]
_CODE = Recent(32)          # code objects of the most recent distinct (name, source) pairs


def compile_source(source: str, name: str, namespace: dict) -> dict:
    """exec generated source under a linecache-registered file name.  The code object
    of a source compiled before (the same model compiled again) is reused, with its
    file name; a bounded number are kept."""
    key = (name, text_digest(source))
    code = _CODE.get(key)
    if code is None:
        _counter[0] += 1
        filename = f"<seqc-generated:{name}:{_counter[0]}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        code = compile(source, filename, "exec")
        _CODE.put(key, code)
    exec(code, namespace)  # noqa: S102 - the source is generated by seqc from validated IR only
    return namespace
