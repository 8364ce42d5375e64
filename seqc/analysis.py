"""Semantic analysis and elaboration: evaluate parameters, check names, arities,
attribute values and symbolic shapes, and elaborate a model (blocks inlined,
repetitions unrolled with hierarchical names) into the graph IR.

Nothing from a spec is evaluated as Python: expressions are walked here and
only ``values.arith`` and ``registry.PARAM_FUNCTIONS`` are applied to them.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import sympy

from . import ast
from .errors import SeqcError, Span, did_you_mean
from .limits import how_to_raise, limit
from .ir import Graph, Ref, dims_equal, join
from .loader import Program, as_spec, load
from .parser import parse
from .registry import OPS, PARAM_FUNCTIONS, REQUIRED, ShapeError
from .values import Sym, Tensor, arith, as_integer, check_attr, fmt_shape, is_number, kind_of, to_number

MAX_NODES = 200_000   # default of SEQC_MAX_NODES (seqc.limits), kept for callers of the old name
# Names a layer cannot take because every compiled torch module already has them.
RESERVED_NAMES = frozenset("""
T_destination add_module apply bfloat16 buffers call_super_init children compile cpu cuda double dump_patches
eval extra_repr float forward get_buffer get_extra_state get_parameter get_submodule half init_state ipu
load_state_dict modules mtia named_buffers named_children named_modules named_parameters parameters
register_backward_hook register_buffer register_forward_hook register_forward_pre_hook
register_full_backward_hook register_full_backward_pre_hook register_load_state_dict_post_hook
register_load_state_dict_pre_hook register_module register_parameter register_state_dict_post_hook
register_state_dict_pre_hook requires_grad_ set_extra_state set_submodule share_memory state_dict step to
to_empty train training type xpu zero_grad graph source plan load_numpy trace state_options layer_modules
check_inputs
""".split())
MAX_DEPTH = 32  # nested block instantiation
MAX_WEIGHTS = 2 ** 34     # 17 billion: beyond any model this machine could hold


class _Scope:
    """Names visible in one definition body: parameters, dims and tensors."""

    def __init__(self, definition: ast.Definition, path: str, values: dict[str, Any]):
        self.definition = definition
        self.path = path
        self.values = dict(values)
        self.modules: dict[str, Span] = {}  # module names claimed in this scope
        self.self_layer: Span | None = None  # the one layer bound `as self`, if any
        self.counters: dict[str, int] = {}


class Elaborator:
    def __init__(self, program: Program, overrides: dict[str, Any] | None):
        self.program = program
        self.overrides = dict(overrides or {})
        self.graph: Graph | None = None
        self.stack: list[str] = []
        self.work = 0            # nodes + statements + block instantiations elaborated so far
        self.max_work = limit("SEQC_MAX_NODES")
        self.free_dims: dict[str, Span] = {}   # size symbols the model's inputs introduce (B, L, ...)

    def _count(self, span, what: str) -> None:
        """One unit of elaboration work; beyond SEQC_MAX_NODES the spec is refused
        here, before more work (blocks that add no node still count)."""
        self.work += 1
        if self.work > self.max_work:
            raise SeqcError(f"model is too large: elaborating it takes more than {self.max_work:,} steps "
                            f"(IR nodes, statements and block instantiations; this {what} is where the limit was "
                            f"reached; {how_to_raise('SEQC_MAX_NODES')})", span)

    # entry point
    def run(self) -> Graph:
        model = self.program.model
        params = self._bind_params(model, self.overrides, model.span, from_python=True)
        shown = {k: to_number(v) for k, v in params.items()}
        if model.name.startswith("__") or model.name in RESERVED_NAMES:
            raise SeqcError(f"'{model.name}' cannot name a model (names starting with '__' and attribute names "
                            f"of compiled modules are reserved)", model.span)
        self.graph = Graph(model.name, shown)
        scope = _Scope(model, "", params)
        outs = self._body(scope, inputs=None)
        self.graph.outputs = [t.ref for t in outs]
        _warn_unused_layers(self.graph)
        total = sum(math.prod(s) for s in self.graph.weight_shapes().values())
        if total > MAX_WEIGHTS:
            raise SeqcError(f"model '{model.name}' would have {total:,} weights (at most {MAX_WEIGHTS:,}); "
                            f"check its dimensions", model.span)
        self.graph.verify()
        return self.graph

    def _bind_params(self, definition, given: dict, call_span, from_python=False):
        names = [p.name for p in definition.params]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            p = next(p for k, p in enumerate(definition.params) if p.name in names[:k])  # the second one
            raise SeqcError(f"parameter '{p.name}' declared twice", p.span)
        for k in given:
            if k not in names:
                msg = f"'{definition.name}' has no parameter '{k}'{did_you_mean(k, names)}"
                if from_python:
                    raise SeqcError(msg, definition.span)
                raise SeqcError(msg, given[k][1])
        env: dict[str, Any] = {}
        for p in definition.params:
            if p.name in given:
                value = given[p.name]
                if from_python:
                    value = self._python_value(p, value, definition)
                else:
                    value = value[0]
            elif p.default is not None:
                value = self._const(p.default, env)
            else:
                raise SeqcError(f"'{definition.name}' needs a value for parameter '{p.name}'", call_span)
            if isinstance(value, Tensor):
                raise SeqcError(f"parameter '{p.name}' must be a number, not a tensor", p.span)
            env[p.name] = value
        return env

    def _python_value(self, p: ast.Param, value, definition):
        if isinstance(value, str):
            # `--param d=64` from the command line: parse it as an expression of the language
            bad = next((ch for ch in value if ch in "{}\n\r#" or ord(ch) < 32 or ord(ch) == 127), None)
            if bad is not None:
                raise SeqcError(f"bad value {value[:60]!r} for parameter '{p.name}': {bad!r} cannot appear in a "
                                f"parameter value (one expression on one line)", p.span)
            try:
                module = parse(f"model _P() {{\n  _v = {value}\n}}\n", f"<param {p.name}>")
                expr = module.definitions[0].body[0].value
            except SeqcError:
                raise SeqcError(f"bad value {value!r} for parameter '{p.name}'", p.span) from None
            try:
                value = self._const(expr, {})
            except SeqcError as e:
                raise SeqcError(f"bad value {value!r} for parameter '{p.name}': {e.message}", p.span) from None
        if not isinstance(value, (bool, int, float, str, Fraction)):
            raise SeqcError(f"bad value {value!r} for parameter '{p.name}'", p.span)
        if isinstance(value, float) and not math.isfinite(value):
            raise SeqcError(f"bad value {value!r} for parameter '{p.name}'", p.span)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2 ** 62:
            raise SeqcError(f"value {value} for parameter '{p.name}' is too large", p.span)
        return value

    def _const(self, expr, env):
        v = self._eval(expr, env, scope=None)
        if isinstance(v, Tensor):
            raise SeqcError("expected a number, found a tensor", expr.span)
        return v

    # -- statements ----------------------------------------------------------------
    def _body(self, scope: _Scope, inputs: list[Tensor] | None, call_span=None):
        d = scope.definition
        declared = [s for s in d.body if isinstance(s, ast.InputDecl)]
        if inputs is not None and len(inputs) != len(declared):
            raise SeqcError(f"block '{d.name}' takes {len(declared)} input(s), got {len(inputs)}", call_span)
        returned = None
        k = 0
        for stmt in d.body:
            self._count(stmt.span, "statement")
            if returned is not None:
                raise SeqcError("statement after 'return'", stmt.span)
            if isinstance(stmt, ast.InputDecl):
                self._input(scope, stmt, inputs[k] if inputs is not None else None, call_span)
                k += 1
            elif isinstance(stmt, ast.Assign):
                self._assign(scope, stmt)
            else:
                returned = [self._tensor(self._eval(v, scope.values, scope), v.span) for v in stmt.values]
        if returned is None:
            raise SeqcError(f"'{d.name}' has no 'return' statement", d.span)
        if not declared:
            raise SeqcError(f"'{d.name}' declares no input", d.span)
        return returned

    def _input(self, scope, stmt: ast.InputDecl, actual: Tensor | None, call_span):
        if stmt.name in scope.values:
            raise SeqcError(f"'{stmt.name}' is already defined", stmt.span)
        dtype = stmt.dtype or "float"
        if dtype not in ("float", "int"):
            raise SeqcError(f"unknown element type '{dtype}' (expected float or int)", stmt.span)
        dims = []
        for i, e in enumerate(stmt.dims):
            if isinstance(e, ast.Name) and e.id not in scope.values:
                if actual is None:
                    self._free_dim(scope, stmt, e)
                    scope.values[e.id] = sympy.Symbol(e.id, positive=True, integer=True)
                elif i < len(actual.shape):
                    scope.values[e.id] = actual.shape[i]
            v = as_integer(self._eval(e, scope.values, None))
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0) and not (
                    isinstance(v, sympy.Expr) and v.is_positive is not False):
                raise SeqcError(f"dimension {i} of '{stmt.name}' must be a positive integer, got {v}", e.span)
            dims.append(sympy.Integer(v) if isinstance(v, int) else v)
        if actual is None:
            node = self.graph.add("input", (), {"name": stmt.name}, [tuple(dims)], dtype=dtype,
                                  name=stmt.name, span=stmt.span)
            scope.values[stmt.name] = Tensor(Ref(node.id), tuple(dims), dtype)
            return
        if len(actual.shape) != len(dims):
            raise SeqcError(f"input '{stmt.name}' of block '{scope.definition.name}' expects "
                            f"{fmt_shape(dims)}, got {fmt_shape(actual.shape)}", call_span)
        for i, (want, got) in enumerate(zip(dims, actual.shape)):
            if not dims_equal(want, got):
                raise SeqcError(f"input '{stmt.name}' of block '{scope.definition.name}': dimension {i} is "
                                f"{got} but the block expects {want} (shape {fmt_shape(dims)})", call_span)
        if actual.dtype != dtype:
            raise SeqcError(f"input '{stmt.name}' of block '{scope.definition.name}' expects {dtype} elements, "
                            f"got {actual.dtype}", call_span)
        scope.values[stmt.name] = actual

    def _free_dim(self, scope, stmt: ast.InputDecl, e: ast.Name):
        """A model input's dimension names a size that is not a parameter: the batch
        and length symbols (at most two, as `run` and `difftest` choose only those);
        a name close to a known number is almost certainly a typo."""
        if e.id in self.free_dims:
            return
        numbers = [n for n, v in scope.values.items() if is_number(v)]
        hint = did_you_mean(e.id, numbers)
        if hint:
            raise SeqcError(f"unknown name '{e.id}' in the shape of input '{stmt.name}'{hint}; a dimension is a "
                            f"parameter, a number or a free size symbol such as B or L", e.span)
        if len(self.free_dims) >= 2:
            first = ", ".join(self.free_dims)
            raise SeqcError(f"unknown name '{e.id}' in the shape of input '{stmt.name}': the model already has the "
                            f"free size symbols {first} (batch and length); other dimensions must be parameters or "
                            f"numbers{did_you_mean(e.id, numbers + list(PARAM_FUNCTIONS))}", e.span)
        self.free_dims[e.id] = e.span

    def _assign(self, scope: _Scope, stmt: ast.Assign):
        value = stmt.value
        if stmt.repeat is not None:
            outs = self._repeat(scope, stmt)
        elif isinstance(value, ast.Call) and (value.func in OPS or value.func in self.program.definitions):
            module = stmt.alias or (stmt.targets[0] if len(stmt.targets) == 1 else None)
            outs = self._call(scope, value, module, stmt.alias is not None)
        else:
            if stmt.alias is not None:
                raise SeqcError("'as' names a layer or block; this is not a call", stmt.span)
            v = self._eval(value, scope.values, scope, name=join(scope.path, stmt.targets[0]))
            outs = [v]
        if len(outs) != len(stmt.targets):
            raise SeqcError(f"{len(stmt.targets)} name(s) on the left but the right side gives {len(outs)} value(s)",
                            stmt.span)
        for t, v in zip(stmt.targets, outs):
            # a value may be named after an op (conv1d = conv1d(x)): calls resolve ops first
            old = scope.values.get(t)
            if old is not None and not isinstance(old, Tensor) and isinstance(v, Tensor) and t in \
                    {p.name for p in scope.definition.params}:
                raise SeqcError(f"'{t}' is a parameter; choose another name for this tensor", stmt.span)
            scope.values[t] = v

    def _repeat(self, scope, stmt: ast.Assign):
        call = stmt.value
        if not isinstance(call, ast.Call) or call.func not in self.program.definitions:
            raise SeqcError("repeat(n) must be followed by a block call", stmt.value.span)
        n = as_integer(self._eval(stmt.repeat, scope.values, None))
        if not (isinstance(n, int) and not isinstance(n, bool)) or n < 0:
            raise SeqcError(f"repeat count must be a non-negative integer, got {n}", stmt.repeat.span)
        if n > 4096:
            raise SeqcError(f"repeat count {n} is too large (at most 4096)", stmt.repeat.span)
        if len(stmt.targets) != 1 or len(call.args) != 1:
            raise SeqcError("a repeated block takes one input and gives one output", stmt.span)
        base = stmt.alias or stmt.targets[0]
        if base == "self":
            raise SeqcError("'as self' places one layer's weights in its block; a repeat needs its own name",
                            stmt.span)
        self._claim(scope, base, stmt.span)
        x = self._tensor(self._eval(call.args[0], scope.values, scope), call.args[0].span)
        for i in range(n):
            (x,) = self._instantiate(scope, call, join(scope.path, base, str(i)), [x], expect=1)
        return [x]

    def _claim(self, scope, module, span):
        if module in RESERVED_NAMES or module.startswith("_"):
            raise SeqcError(f"'{module}' cannot name a layer: it is reserved (an attribute of every "
                            f"compiled module); choose another name", span)
        if module in scope.modules:
            raise SeqcError(f"a layer named '{module}' already exists in this block (first at "
                            f"{scope.modules[module]})", span)
        scope.modules[module] = span

    def _call(self, scope: _Scope, call: ast.Call, module: str | None, explicit: bool):
        if call.func in self.program.definitions:
            if module == "self":
                raise SeqcError("'as self' places a layer's weights in its block; a block call needs its own name",
                                call.span)
            if module is None:
                module = self._auto_name(scope, call.func.lower())
            self._claim(scope, module, call.span)
            args = [self._tensor(self._eval(a, scope.values, scope), a.span) for a in call.args]
            return self._instantiate(scope, call, join(scope.path, module), args)
        return self._layer(scope, call, module, explicit)

    def _auto_name(self, scope, base):
        k = scope.counters.get(base, 0)
        while f"{base}_{k}" in scope.modules or f"{base}_{k}" in scope.values:
            k += 1
        scope.counters[base] = k + 1
        return f"{base}_{k}"

    def _instantiate(self, scope, call: ast.Call, path: str, args: list[Tensor], expect=None):
        definition = self.program.definitions[call.func]
        if definition.kind != "block":
            raise SeqcError(f"'{call.func}' is a model; only blocks can be instantiated", call.span)
        if call.func in self.stack:
            cycle = " -> ".join(self.stack[self.stack.index(call.func):] + [call.func])
            raise SeqcError(f"block '{call.func}' instantiates itself ({cycle})", call.span)
        if len(self.stack) >= MAX_DEPTH:
            raise SeqcError(f"blocks nested more than {MAX_DEPTH} deep", call.span)
        self._count(call.span, f"instantiation of block '{call.func}'")
        given = {}
        for kw in call.kwargs:
            v = self._eval(kw.value, scope.values, scope)
            if isinstance(v, Tensor):
                raise SeqcError(f"block parameter '{kw.name}' must be a number, not a tensor "
                                f"(pass tensors positionally)", kw.span)
            given[kw.name] = (v, kw.span)
        params = self._bind_params(definition, given, call.span)
        inner = _Scope(definition, path, params)
        self.stack.append(call.func)
        try:
            outs = self._body(inner, args, call.span)
        finally:
            self.stack.pop()
        if expect is not None and len(outs) != expect:
            raise SeqcError(f"block '{call.func}' returns {len(outs)} values; repeat needs exactly one", call.span)
        if expect == 1 and args and tuple(outs[0].shape) != tuple(args[0].shape):
            raise SeqcError(f"repeat needs a block whose output shape equals its input shape; '{call.func}' maps "
                            f"{fmt_shape(args[0].shape)} to {fmt_shape(outs[0].shape)}", call.span)
        return outs

    # -- layers -------------------------------------------------------------------------
    def _layer(self, scope, call: ast.Call, module: str | None, explicit: bool, name_hint: str = ""):
        spec = OPS[call.func]
        tensors: list[tuple[Tensor, Span]] = []
        attrs_given: dict[str, tuple[Any, Span]] = {}
        attr_names = [a.name for a in spec.attrs]
        pos_attrs = list(attr_names)
        required = len(spec.inputs) - len(spec.optional_inputs)
        for a in call.args:
            # a bare name in an enum attribute's position is its value (conv1d(x, 4, true, silu)), as
            # after `activation =`; while required tensor inputs are missing it stays an undefined name
            enum = bool(pos_attrs) and spec.attr(pos_attrs[0]).type == "enum" and len(tensors) >= required
            v = self._eval(a, scope.values, scope, enum=enum)
            if isinstance(v, Tensor):
                if attrs_given:
                    raise SeqcError("tensor argument after attribute arguments", a.span)
                if not spec.variadic and len(tensors) >= len(spec.inputs):
                    raise SeqcError(f"'{spec.name}' takes at most {len(spec.inputs)} tensor input(s)", a.span)
                tensors.append((v, a.span))
            else:
                if not pos_attrs:
                    raise SeqcError(f"too many arguments for '{spec.name}'", a.span)
                attrs_given[pos_attrs.pop(0)] = (v, a.span)
        named_inputs = {}
        for kw in call.kwargs:
            if kw.name in spec.inputs and not spec.variadic:
                named_inputs[kw.name] = (self._tensor(self._eval(kw.value, scope.values, scope), kw.value.span),
                                         kw.value.span)
                continue
            if kw.name not in attr_names:
                choices = attr_names + ([] if spec.variadic else list(spec.inputs))
                raise SeqcError(f"'{spec.name}' has no argument '{kw.name}'{did_you_mean(kw.name, choices)}", kw.span)
            if kw.name in attrs_given:
                raise SeqcError(f"argument '{kw.name}' given twice", kw.span)
            is_enum = spec.attr(kw.name).type == "enum"
            if is_enum and isinstance(kw.value, ast.Name) and kw.value.id in spec.attr(kw.name).choices:
                # one of the attribute's own values wins over a dimension or parameter of that name
                # (dim = time where `time` also names an input dimension)
                attrs_given[kw.name] = (kw.value.id, kw.span)
                continue
            attrs_given[kw.name] = (self._eval(kw.value, scope.values, scope, enum=is_enum), kw.span)
        if named_inputs:
            slots = list(spec.inputs)
            for k, (t, sp) in named_inputs.items():
                idx = slots.index(k)
                if idx < len(tensors):
                    raise SeqcError(f"input '{k}' given both by position and by name", sp)
            ordered = list(tensors)
            for k in slots[len(tensors):]:
                if k in named_inputs:
                    ordered.append(named_inputs.pop(k))
                elif named_inputs:
                    missing = k
                    if k in spec.optional_inputs:
                        raise SeqcError(f"optional input '{k}' must be given before later inputs", call.span)
                    raise SeqcError(f"'{spec.name}' is missing input '{missing}'", call.span)
            tensors = ordered
        required = len(spec.inputs) - len(spec.optional_inputs)
        if spec.variadic:
            if not tensors:
                raise SeqcError(f"'{spec.name}' needs at least one tensor input", call.span)
        elif len(tensors) < required:
            missing = spec.inputs[len(tensors)]
            raise SeqcError(f"'{spec.name}' takes {required} tensor input(s) ({', '.join(spec.inputs[:required])}), "
                            f"got {len(tensors)}; missing '{missing}'", call.span)
        tie_span = attrs_given["tie"][1] if "tie" in attrs_given else None
        for a in spec.attrs:               # a layer attribute names another layer by the value it produced
            if a.type == "layer" and a.name in attrs_given:
                attrs_given[a.name] = (self._layer_of(spec, a, *attrs_given[a.name]), attrs_given[a.name][1])
        attrs = self._check_attrs(spec, attrs_given, call.span)
        for k, (t, sp) in enumerate(tensors):
            want = "int" if spec.int_input and k == 0 else "float"
            if t.dtype != want:
                raise SeqcError(f"'{spec.name}' expects {'integer tokens' if want == 'int' else 'float values'} "
                                f"here, got {t.dtype} elements", sp)
        shapes = [t.shape for t, _ in tensors]
        try:
            out_shapes = spec.shape(shapes, attrs)
            if spec.has_weights:
                spec.weights(shapes, attrs)  # weight and state sizes must be numbers, not symbols
            if spec.stateful:
                spec.state(shapes, attrs)
        except ShapeError as e:
            where = tensors[e.arg][1] if e.arg is not None and e.arg < len(tensors) else call.span
            detail = " with shapes " + ", ".join(fmt_shape(s) for s in shapes)
            raise SeqcError(f"'{spec.name}': {e.message}{detail}", where) from None
        except TypeError:  # int() of a symbolic dimension inside a shape or weight rule
            symbolic = [(k, i, d) for k, (t, _) in enumerate(tensors) for i, d in enumerate(t.shape)
                        if isinstance(d, sympy.Expr) and d.free_symbols]
            if not symbolic:
                raise
            k, i, d = max(symbolic, key=lambda x: x[1])  # the feature (last) dimension first
            known = [n for n, v in scope.values.items() if is_number(v)]
            raise SeqcError(f"'{spec.name}' needs a known size for dimension {i} of its input, but it is the "
                            f"symbol '{d}'{did_you_mean(str(d), known)}", tensors[k][1]) from None
        owns = spec.is_layer
        if owns:
            if module is None:
                module = self._auto_name(scope, spec.name)
            if module == "self":
                if not scope.path:
                    raise SeqcError("'as self' needs an enclosing block; at the top level give the layer a name",
                                    call.span)
                if scope.self_layer is not None:
                    raise SeqcError(f"block '{scope.definition.name}' already has an 'as self' layer (at "
                                    f"{scope.self_layer}); a block can be at most one layer itself", call.span)
                scope.self_layer = call.span
                name = scope.path
                for k in {k.split(".")[0] for k in spec.weights(shapes, attrs)}:
                    self._claim(scope, k, call.span)
            else:
                self._claim(scope, module, call.span)
                name = join(scope.path, module)
        else:
            if explicit and module == "self":
                raise SeqcError(f"'as self' places a layer's weights in its block, but '{spec.name}' has none",
                                call.span)
            name = name_hint or (join(scope.path, module) if module else "")
        if attrs.get("tie"):
            self._check_tie(spec, attrs, shapes, tie_span)
        self._count(call.span, f"'{spec.name}' layer")
        node = self.graph.add(spec.name, [t.ref for t, _ in tensors], attrs, out_shapes, name=name, span=call.span,
                              dtype="float")
        outs = [Tensor(Ref(node.id, i), tuple(s), "float") for i, s in enumerate(out_shapes)]
        return outs

    def _layer_of(self, spec, a, v, span) -> str:
        """The name of the layer whose output `v` is (`tie = embeddings`)."""
        if not isinstance(v, Tensor):
            raise SeqcError(f"'{spec.name}' argument '{a.name}' must name a layer by its value (e.g. "
                            f"{a.name} = embeddings), got {kind_of(v)}", span)
        node = self.graph.nodes[v.ref.node]
        if not (node.spec is not None and node.spec.has_weights and node.name):
            raise SeqcError(f"'{spec.name}' argument '{a.name}': this value comes from '{node.op}', which is not a "
                            f"layer with weights", span)
        return node.attrs.get("tie") or node.name      # tying to a tied layer ties to its owner

    def _check_tie(self, spec, attrs, shapes, span):
        """The tied weight exists and has this layer's weight shape."""
        own = spec.weights(shapes, attrs)["weight"]
        owner = next(n for n in self.graph.nodes.values() if n.name == attrs["tie"] and n.spec is not None
                     and n.spec.has_weights)
        theirs = owner.weight_shapes().get("weight")
        if theirs is None:
            raise SeqcError(f"'{spec.name}': cannot tie to '{owner.name}' ({owner.op}), which has no 'weight'", span)
        own, theirs = tuple(int(d) for d in own), tuple(int(d) for d in theirs)
        if own != theirs:
            raise SeqcError(f"'{spec.name}': cannot tie to '{owner.name}': its weight is {theirs} but this "
                            f"{spec.name} needs {own}", span)

    def _check_attrs(self, spec, given, span):
        attrs = {}
        for a in spec.attrs:
            if a.name in given:
                v, sp = given[a.name]
                attrs[a.name] = check_attr(spec, a, v, sp)
            elif a.default is REQUIRED:
                raise SeqcError(f"'{spec.name}' needs argument '{a.name}'" + (f" ({a.doc})" if a.doc else ""), span)
            else:
                attrs[a.name] = a.default
        if spec.validate is not None:
            try:
                spec.validate(attrs)
            except ShapeError as e:       # point at an attribute the check names, if the spec gave one
                named = e.attr if isinstance(e.attr, tuple) else (e.attr,)
                where = next((given[k][1] for k in named if k in given), span)
                raise SeqcError(f"'{spec.name}': {e.message}", where) from None
        return attrs

    # -- expressions ----------------------------------------------------------------
    def _tensor(self, v, span) -> Tensor:
        if not isinstance(v, Tensor):
            raise SeqcError(f"expected a tensor, found {kind_of(v)}", span)
        return v

    def _eval(self, e, env, scope, *, enum=False, name=""):
        if isinstance(e, ast.Number):
            return e.value
        if isinstance(e, ast.String):
            return e.value
        if isinstance(e, ast.Bool):
            return e.value
        if isinstance(e, ast.Name):
            if e.id in env:
                return env[e.id]
            if enum:
                return Sym(e.id)
            known = list(env) + list(PARAM_FUNCTIONS)
            raise SeqcError(f"undefined name '{e.id}'{did_you_mean(e.id, known)}", e.span)
        if isinstance(e, ast.ListExpr):
            return [self._eval(x, env, scope) for x in e.items]
        if isinstance(e, ast.Neg):
            v = self._eval(e.operand, env, scope)
            if isinstance(v, sympy.Expr):
                return -v
            return arith("-", 0, v, e.span)
        if isinstance(e, ast.BinOp):
            a = self._eval(e.left, env, scope)
            b = self._eval(e.right, env, scope)
            if isinstance(a, Tensor) or isinstance(b, Tensor):
                return self._tensor_binop(scope, e, a, b, name)
            if isinstance(a, sympy.Expr) or isinstance(b, sympy.Expr):
                return self._dimarith(e, a, b)
            return arith(e.op, a, b, e.span)
        if isinstance(e, ast.Call):
            if e.func in PARAM_FUNCTIONS and not any(isinstance(self._peek(a, env), Tensor) for a in e.args):
                if e.kwargs:
                    raise SeqcError(f"'{e.func}' takes no keyword arguments", e.kwargs[0].span)
                args = [self._eval(a, env, scope) for a in e.args]
                for a, node in zip(args, e.args):
                    if not is_number(a):
                        raise SeqcError(f"'{e.func}' expects numbers, got {kind_of(a)}", node.span)
                if not args or (e.func in ("ceil", "floor", "int", "round") and len(args) != 1):
                    raise SeqcError(f"'{e.func}' takes {'one argument' if e.func not in ('min', 'max') else 'arguments'}",
                                    e.span)
                try:
                    r = PARAM_FUNCTIONS[e.func](*args)
                except (OverflowError, ValueError, ZeroDivisionError) as err:
                    raise SeqcError(f"'{e.func}' of {', '.join(str(a) for a in args)}: {err}", e.span) from None
                if isinstance(r, int) and not isinstance(r, bool) and abs(r) > 2 ** 62:
                    raise SeqcError(f"'{e.func}' gives {r:.3g}, too large for a size (at most 2**62)", e.span)
                return r
            if scope is None:
                raise SeqcError(f"'{e.func}' cannot be used in a parameter expression", e.span)
            if e.func in self.program.definitions:
                outs = self._call(scope, e, None, False)
            elif e.func in OPS:
                outs = self._layer(scope, e, None, False, name_hint=name)
            else:
                known = list(OPS) + list(self.program.definitions) + list(PARAM_FUNCTIONS)
                raise SeqcError(f"unknown layer or block '{e.func}'{did_you_mean(e.func, known)}", e.span)
            if len(outs) != 1:
                raise SeqcError(f"'{e.func}' gives {len(outs)} values; bind them with "
                                f"'a, b = {e.func}(...)'", e.span)
            return outs[0]
        raise AssertionError(f"unknown expression {e!r}")

    def _peek(self, a, env):
        return env.get(a.id) if isinstance(a, ast.Name) else None

    def _dimarith(self, e, a, b):
        if not all(isinstance(v, (sympy.Expr, int)) and not isinstance(v, bool) for v in (a, b)):
            raise SeqcError(f"cannot apply '{e.op}' to {kind_of(a)} and {kind_of(b)}", e.span)
        a, b = sympy.sympify(a), sympy.sympify(b)
        if e.op not in ("+", "-", "*", "//"):
            raise SeqcError(f"'{e.op}' is not supported on symbolic dimensions", e.span)
        if e.op == "//":
            if b == 0:
                raise SeqcError("division by zero", e.span)
            # floor(floor(x) / n) == floor(x / n) for an integer n > 0: keeps `L // 2 // 2 ...` one floor deep
            if isinstance(a, sympy.floor) and b.is_Integer and b > 0:
                r = sympy.floor(a.args[0] / b)
            else:
                r = sympy.floor(a / b)
        else:
            r = {"+": a + b, "-": a - b, "*": a * b}[e.op]
        most = limit("SEQC_MAX_DIM_OPS")
        if sympy.count_ops(r) > most:
            raise SeqcError(f"shape expression too complex (more than {most} operations; "
                            f"{how_to_raise('SEQC_MAX_DIM_OPS')})", e.span)
        return r

    def _scalar_binop(self, e: ast.BinOp, a, b, name):
        """tensor (op) number or number (op) tensor -> one `affine` node (x * scale + shift)."""
        t, c = (a, b) if isinstance(a, Tensor) else (b, a)
        side = e.left if t is a else e.right
        if isinstance(c, bool) or not is_number(c):
            raise SeqcError(f"cannot apply '{e.op}' to {kind_of(a)} and {kind_of(b)} (a tensor combines with "
                            f"a tensor or a number)", e.span)
        if t.dtype != "float":
            raise SeqcError(f"'{e.op}' needs a float tensor; this one holds integer tokens (embed them first)",
                            side.span)
        c = float(c)
        if not math.isfinite(c):
            raise SeqcError(f"'{e.op}' with a non-finite number {c}", e.span)
        tensor_left = t is a
        if e.op == "*":
            attrs = {"scale": c, "shift": 0.0}
        elif e.op == "/" and tensor_left:
            if c == 0:
                raise SeqcError("division of a tensor by zero", e.right.span)
            attrs = {"scale": 1.0 / c, "shift": 0.0}
        elif e.op == "+":
            attrs = {"scale": 1.0, "shift": c}
        elif e.op == "-":
            attrs = {"scale": 1.0, "shift": -c} if tensor_left else {"scale": -1.0, "shift": c}
        else:
            what = "a number by a tensor" if e.op == "/" else f"'{e.op}' between a tensor and a number"
            raise SeqcError(f"cannot apply '{e.op}' to {kind_of(a)} and {kind_of(b)}: {what} is not supported "
                            f"(tensors and numbers combine with +, -, *, and tensor / number)", e.span)
        self._count(e.span, f"'{e.op}'")
        node = self.graph.add("affine", [t.ref], attrs, [tuple(t.shape)], name=name, span=e.span)
        return Tensor(Ref(node.id), tuple(t.shape), "float")

    def _tensor_binop(self, scope, e: ast.BinOp, a, b, name):
        ops = {"+": "add", "-": "sub", "*": "mul", "/": "div"}
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return self._scalar_binop(e, a, b, name)
        if e.op not in ops:
            raise SeqcError(f"cannot apply '{e.op}' to {kind_of(a)} and {kind_of(b)}"
                            " (tensors combine with +, -, * and /)", e.span)
        spec = OPS[ops[e.op]]
        for t, side in ((a, e.left), (b, e.right)):
            if t.dtype != "float":
                raise SeqcError(f"'{e.op}' needs float tensors; this one holds integer tokens (embed them first)",
                                side.span)
        try:
            shapes = spec.shape([a.shape, b.shape], {})
        except ShapeError as err:
            raise SeqcError(f"'{e.op}': {err.message}: {fmt_shape(a.shape)} vs {fmt_shape(b.shape)}",
                            e.span) from None
        self._count(e.span, f"'{e.op}'")
        node = self.graph.add(spec.name, [a.ref, b.ref], {}, shapes, name=name, span=e.span)
        return Tensor(Ref(node.id), tuple(shapes[0]), "float")


def _warn_unused_layers(graph: Graph) -> None:
    """A layer with weights whose result reaches no output: its weights are trained
    by nothing and sit in the state_dict unused -- usually a typo.  Warn (located)."""
    import networkx as nx
    import warnings

    from .errors import SeqcWarning
    live = set()
    for r in graph.outputs:
        live.add(r.node)
        live |= nx.ancestors(graph.nx, r.node)
    for n in graph.nodes.values():
        if n.id not in live and n.op != "input" and n.spec is not None and n.spec.has_weights:
            warnings.warn(SeqcWarning(f"the result of '{n.op}' layer '{n.name}' is never used (its weights reach "
                                      f"no output)", n.span), stacklevel=2)


def build_graph(spec=None, params: dict | None = None, *, path=None, source=None, include_paths=None,
                allow_any_include=None) -> Graph:
    """Elaborate a spec with parameter overrides into the IR.

    The spec is `spec` (a ``pathlib.Path`` or ``seqc.Spec`` names a file; a str
    follows the rule of ``seqc.loader``), or explicitly ``path=`` (a file) or
    ``source=`` (its text).  ``include_paths`` are extra directories that
    ``include`` may resolve against; ``allow_any_include=True`` lifts the
    include roots.  ``params`` maps top-level parameter names to values."""
    if params is not None and not isinstance(params, dict):
        raise SeqcError(f"params must be a dict of parameter names to values, not {type(params).__name__}")
    for k in params or {}:
        if not isinstance(k, str):
            raise SeqcError(f"params keys must be parameter names (str), got {k!r}")
    how = {k: v for k, v in (("include_paths", include_paths), ("allow_any_include", allow_any_include))
           if v is not None}
    if isinstance(spec, ast.Module) and path is None and source is None:
        program = load(spec, **how)
    else:
        program = load(as_spec(spec, path=path, source=source, **how))
    return Elaborator(program, params).run()
