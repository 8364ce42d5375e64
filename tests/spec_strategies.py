"""Hypothesis strategies for random *valid* .seq specs (the compiler fuzzer's generator).

``specs()`` draws a whole program: a model (float or token inputs, one or several
inputs and outputs, parameters whose defaults use parameter arithmetic) built
from random compositions of every op the language has (with attention's variants -
grouped-query, rotary, sliding window, bidirectional -, ``direction = bidirectional``
on ssm / selective_ssm / rglru, and linears tied to an earlier layer's weight with
``tie =``), user-defined blocks with
parameters and defaults (called plainly, ``as name``, ``repeat(n) ... as name``,
holding an ``as self`` layer, nested), blocks of the standard library
(``include "std/..."``) and blocks placed in generated sibling files that the
main file includes.  The generator tracks every tensor's feature width, so each
spec it writes is valid by construction; each statement also records *mutation
sites*: a span of its text and a replacement that makes the spec invalid for a
known reason (an unknown name, a bad attribute value, a wrong dimension, an
illegal plan).

A drawn ``Spec`` is plain text (``str(spec)`` prints every file), so a failing
example shrinks to a spec that can be pasted into a regression file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from hypothesis import strategies as st

from seqc.registry import OPS

ACTIVATIONS = ("silu", "gelu", "relu", "softplus", "sigmoid", "tanh", "gelu_tanh")
ACT_ATTR = ("identity",) + ACTIVATIONS
SSM_DISC = ("zoh", "bilinear", "euler", "backward_euler")
SEL_DISC = ("mamba", "zoh", "bilinear")
MAIN = "main.seq"
RNNS = ("lstm", "gru") if "gru" in OPS else ("lstm",)


@dataclass(frozen=True)
class Site:
    """Replacing ``old`` at ``offset`` of line ``line`` (1-based) of ``file`` by ``new``
    makes the spec invalid; ``kind`` says why and ``stage`` where it must be caught
    ("build": ``seqc.build_graph``, "compile": only when planning for a backend)."""

    file: str
    line: int
    offset: int
    old: str
    new: str
    kind: str
    stage: str = "build"


@dataclass
class Spec:
    files: dict[str, str]                       # file name -> text; MAIN is the model
    inputs: list[tuple[str, int | None]]        # (name, feature width or None for tokens)
    sites: list[Site] = field(default_factory=list)
    features: frozenset = frozenset()
    params: dict = field(default_factory=dict)   # the model's parameters and their values

    def __repr__(self) -> str:          # hypothesis prints the arguments; the text itself is in the note
        return f"Spec(files={sorted(self.files)}, features={sorted(self.features)})"

    def __str__(self) -> str:
        if len(self.files) == 1:
            return self.files[MAIN]
        return "\n".join(f"# ---- {name} ----\n{text}" for name, text in sorted(self.files.items(),
                                                                                key=lambda kv: kv[0] != MAIN))

    def write(self, directory: str, files: dict[str, str] | None = None) -> str:
        """Write every file into `directory`; the path of the main file."""
        for name, text in (files or self.files).items():
            with open(os.path.join(directory, name), "w") as f:
                f.write(text)
        return os.path.join(directory, MAIN)

    def mutated(self, site: Site) -> dict[str, str]:
        lines = self.files[site.file].split("\n")
        text = lines[site.line - 1]
        assert text[site.offset:site.offset + len(site.old)] == site.old, (text, site)
        lines[site.line - 1] = text[:site.offset] + site.new + text[site.offset + len(site.old):]
        return {**self.files, site.file: "\n".join(lines)}


class Line:
    """One statement being written, with the mutation sites inside it."""

    def __init__(self, text: str = ""):
        self.text = text
        self.sites: list[tuple[int, str, str, str, str]] = []

    def add(self, s: str) -> "Line":
        self.text += s
        return self

    def mut(self, old: str, new: str, kind: str, stage: str = "build") -> "Line":
        self.sites.append((len(self.text), old, new, kind, stage))
        self.text += old
        return self

    def alt(self, new: str, kind: str) -> "Line":
        """Another invalid replacement of the span the last `mut` wrote."""
        offset, old, _, _, stage = self.sites[-1]
        self.sites.append((offset, old, new, kind, stage))
        return self


@dataclass
class T:
    """A tensor in scope: its name and feature width (None: integer tokens); `weight`: the shape of
    the `weight` of the layer that produced it, where another linear may tie to it."""
    name: str
    width: int | None
    weight: tuple[int, int] | None = None
    layer: str = ""                     # the op of that layer


class File:
    def __init__(self, name: str):
        self.name = name
        self.includes: list[str] = []
        self.items: list[list[Line]] = []      # each item: header line, body lines, closing line

    def include(self, path: str):
        if path not in self.includes:
            self.includes.append(path)


class Gen:
    """Writes one spec from hypothesis draws."""

    def __init__(self, draw):
        self.draw = draw
        self.files: dict[str, File] = {MAIN: File(MAIN)}
        self.order = [MAIN]                     # a file includes only files after it (no cycles)
        self.n_blocks = 0
        self.blocks: list[dict] = []            # blocks defined so far (reusable where widths match)
        self.features: set[str] = set()
        self.long_names = False

    # -- small choices ------------------------------------------------------------------
    def d(self, strategy, label=None):
        return self.draw(strategy, label=label)

    def flag(self, p_true=0.5) -> bool:
        return self.d(st.integers(0, 99)) >= 100 - p_true * 100     # shrinks towards False

    def pick(self, seq):
        return self.d(st.sampled_from(list(seq)))

    def dim(self, value: int, env: dict[str, int]) -> str:
        """An expression over the parameters in `env` that evaluates to `value`."""
        # integer values written as exact fractions, powers and integral floats are integers too
        options = [str(value), f"{2 * value} / 2", f"{value}.0", f"{value} ** 1"]
        for p, v in env.items():
            if not isinstance(v, int) or v <= 0:
                continue
            if v == value:
                options += [p, f"{p} * 1", f"max({p}, 1)"]
            elif value % v == 0:
                options.append(f"{value // v} * {p}")
            elif v > value:
                options += [f"{p} - {v - value}", f"min({p}, {value})"]
            else:
                options += [f"{p} + {value - v}", f"max({p}, {value})"]
            if v % value == 0 and v != value:
                options.append(f"{p} // {v // value}")
            if v > 1:
                options.append(f"ceil({value * v - (v - 1)} / {p})")   # = value
            options.append(f"{p} * {value} / {p}")
        if self.flag(0.3):
            return str(value)
        choice = self.pick(options)
        if choice != str(value):
            self.features.add("param-arithmetic")
        return choice

    # -- definitions ---------------------------------------------------------------------
    def scope_name(self, scope) -> str:
        scope["n"] += 1
        if self.long_names:            # long statements: the formatter has to break them
            return f"a_rather_long_tensor_name_{scope['n']}"
        return f"t{scope['n']}"

    def body(self, scope, pool: list[T], n_stmts: int, lines: list[Line]) -> list[T]:
        """Append `n_stmts` random statements; returns the pool (new tensors appended)."""
        for _ in range(n_stmts):
            self.statement(scope, pool, lines)
        return pool

    def float_pool(self, pool):
        return [t for t in pool if t.width is not None]

    def choose(self, pool, pred=lambda t: True) -> T | None:
        cands = [t for t in self.float_pool(pool) if pred(t)]
        if not cands:
            return None
        # prefer the newest tensor (chains), sometimes an older one (diamonds)
        return cands[-1] if self.flag(0.6) else self.pick(cands)

    def tensor_arg(self, scope, pool, x: T) -> str:
        """x by name, or wrapped in an inline activation (a nested call)."""
        if self.flag(0.3):
            act = self.pick(ACTIVATIONS)
            self.features.add("inline-activation")
            return f"{act}({x.name})"
        return x.name

    def statement(self, scope, pool, lines):
        ops = ["linear", "conv1d", "norm", "activation", "dropout", "binary", "gate", "glu", "split", "concat",
               "math", "reduce",
               "ssm", "selective_ssm", "lstm", "attention", "mixer",
               "block", "block", "block", "std_block", "std_block"]
        if scope["depth"] >= 2:
            ops = [o for o in ops if o not in ("block", "std_block")]
        if any(t.width is None for t in pool):
            ops.append("embedding")
        op = self.d(st.sampled_from(ops), label="op")
        x = self.choose(pool)
        getattr(self, "op_" + op)(scope, pool, lines, x)

    def bind(self, scope, pool, lines, line: Line, width: int, target: str | None = None, alias=True) -> T:
        name = target or self.scope_name(scope)
        op = line.text.split("(")[0]
        # (not an activation: those names are also attribute values, act = silu, which a tensor would shadow)
        if target is None and op.isidentifier() and op not in scope["used"] and op not in ACTIVATIONS \
                and self.flag(0.1):
            name = op                           # conv1d = conv1d(x): a value named after an op
            scope["used"].add(op)
            self.features.add("op-named-value")
        full = Line(f"{name} = ")
        full.sites = [(o + len(full.text), *rest) for o, *rest in line.sites]
        full.text += line.text
        if alias and self.flag(0.15):
            full.add(f" as {name}_l")
            self.features.add("as-name")
        lines.append(full)
        t = T(name, width)
        pool.append(t)
        return t

    def attrs(self, line: Line, items: list[tuple[str, str, str | None, str | None]]):
        """Keyword attributes in random order; each (key, value, bad value, kind of bad)."""
        items = list(items)
        if len(items) > 1:
            perm = self.d(st.permutations(range(len(items))))
            items = [items[i] for i in perm]
        for key, value, bad, kind in items:
            line.add(", ").mut(key, key + "_", "unknown name").add(" = ")
            if bad is not None:
                # a tensor (or, where there is none called x, an unknown name) is never an attribute value
                line.mut(value, bad, kind).alt("x", "bad attribute value")
            else:
                line.add(value)

    # -- ops -----------------------------------------------------------------------------------
    def op_linear(self, scope, pool, lines, x, tie=True):
        if tie and any(t.weight is not None for t in pool) and self.flag(0.25):
            return self.op_tie(scope, pool, lines, x)
        out = self.d(st.integers(1, 8))
        line = Line(f"linear({self.tensor_arg(scope, pool, x)}, ")
        if self.flag(0.5):
            line.mut(self.dim(out, scope["env"]), "0", "bad attribute value")
        else:
            line.add("out = ").mut(self.dim(out, scope["env"]), "-1", "bad attribute value")
        extra = []
        init = self.pick(["none", "none", "mamba_dt", "zeros"])
        if init != "none":
            extra.append(("init", init, "xavier", "bad attribute value"))
            self.features.add(f"linear-init-{init}")
        if init == "mamba_dt" and self.flag(0.3):
            extra.append(("dt_min", "0.002", "0.5", "dt range"))
        if init != "mamba_dt" and self.flag(0.4):
            extra.append(("bias", self.pick(["true", "false"]), "2", "bad attribute value"))
        self.attrs(line, extra)
        line.add(")")
        self.features.add("linear")
        t = self.bind(scope, pool, lines, line, out)
        t.weight, t.layer = (out, x.width), "linear"

    def op_tie(self, scope, pool, lines, x):
        """A linear tied to the `weight` of an earlier layer of the same shape (an embedding: a tied
        head; or another linear)."""
        pairs = [(t, y) for t in pool if t.weight is not None for y in self.float_pool(pool)
                 if y.width == t.weight[1]]
        if not pairs:
            return self.op_linear(scope, pool, lines, x, tie=False)
        owner, y = pairs[-1] if self.flag(0.5) else self.pick(pairs)
        out = owner.weight[0]
        line = Line(f"linear({self.tensor_arg(scope, pool, y)}, {self.dim(out, scope['env'])}")
        extra = [("tie", owner.name, "3", "bad attribute value")]
        if self.flag(0.5):
            extra.append(("bias", self.pick(["true", "false"]), "2", "bad attribute value"))
        self.attrs(line, extra)
        line.add(")")
        self.features.add(f"tie-{owner.layer}")
        t = self.bind(scope, pool, lines, line, out)
        t.weight, t.layer = owner.weight, owner.layer

    def op_conv1d(self, scope, pool, lines, x):
        k = self.d(st.integers(1, 4))
        act = self.pick(ACT_ATTR)
        line = Line(f"conv1d({self.tensor_arg(scope, pool, x)}")
        extra = [("kernel", self.dim(k, scope["env"]), "0", "bad attribute value"),
                 ("activation", act, "swish", "bad attribute value")]
        if self.flag(0.4):
            extra.append(("bias", self.pick(["true", "false"]), "1", "bad attribute value"))
        self.attrs(line, extra[:1 + self.d(st.integers(0, len(extra) - 1))])
        line.add(")")
        self.features.add("conv1d")
        self.bind(scope, pool, lines, line, x.width)

    def op_mixer(self, scope, pool, lines, x):
        """One of the newer sequence mixers (one slot of the op draw, so the older ops keep their share)."""
        getattr(self, "op_" + self.pick(["ssd", "gla", "rglru"]))(scope, pool, lines, x)

    def op_norm(self, scope, pool, lines, x):
        kind = self.pick(["layernorm", "rmsnorm", "gated_rmsnorm"])
        if kind == "gated_rmsnorm":
            return self.op_gated_rmsnorm(scope, pool, lines, x)
        line = Line(f"{kind}({x.name}")
        extra = []
        if self.flag(0.4):
            extra.append(("eps", self.pick(["1e-5", "0.001", "1e-6"]), "-1e-5", "bad attribute value"))
        if kind == "layernorm" and self.flag(0.4):
            extra.append(("bias", self.pick(["true", "false"]), "0", "bad attribute value"))
        self.attrs(line, extra)
        line.add(")")
        self.features.add(kind)
        self.bind(scope, pool, lines, line, x.width)

    def op_activation(self, scope, pool, lines, x):
        act = self.pick(ACTIVATIONS)
        line = Line().mut(act, act + "x", "unknown name").add(f"({x.name})")
        self.features.add("activation")
        self.bind(scope, pool, lines, line, x.width, alias=False)

    def op_dropout(self, scope, pool, lines, x):
        line = Line(f"dropout({x.name}")
        if self.flag(0.7):
            self.attrs(line, [("p", self.pick(["0.0", "0.1", "0.5"]), "1.5", "bad attribute value")])
        line.add(")")
        self.features.add("dropout")
        self.bind(scope, pool, lines, line, x.width, alias=False)

    def _partner(self, pool, x):
        return self.choose(pool, lambda t: t.width == x.width) or x

    def _wrong_width(self, pool, x):
        return next((t for t in self.float_pool(pool) if t.width != x.width), None)

    def op_binary(self, scope, pool, lines, x):
        y = self._partner(pool, x)
        wrong = self._wrong_width(pool, x)
        form = self.pick(["+", "-", "*", "add", "sub", "mul"])
        line = Line()
        if form in "+-*":
            line.add(f"{x.name} {form} ")
        else:
            line.add(f"{form}({x.name}, ")
        if wrong is not None:
            line.mut(y.name, wrong.name, "wrong dimension")
        else:
            line.mut(y.name, y.name + "_undefined", "unknown name")
        if form not in "+-*":
            line.add(")")
        self.features.add("binary")
        self.bind(scope, pool, lines, line, x.width, alias=False)

    def op_math(self, scope, pool, lines, x):
        """exp / sqrt / softmax / rms, scalar x tensor arithmetic and tensor '/' (kept finite)."""
        y = self._partner(pool, x)
        form = self.pick(["exp", "sqrt", "softmax", "rms", "scalar", "div"])
        text = {"exp": f"exp(tanh({x.name}))", "sqrt": f"sqrt({x.name} * {x.name} + 1)",
                "softmax": f"softmax({x.name})", "rms": f"rms({x.name}, eps = {self.pick(['1e-6', '0.01'])})",
                "scalar": f"{self.pick(['0.5 * ', '2 - ', '1 + '])}{x.name}{self.pick([' / 4', ' * 3', ' - 1'])}",
                "div": f"{x.name} / sqrt(1.5 + {y.name} * {y.name})"}[form]
        self.features.add("math")
        self.bind(scope, pool, lines, Line(text), x.width, alias=False)

    def op_reduce(self, scope, pool, lines, x):
        """mean / sum / max / last over time (running) or features (width 1)."""
        how, dim = self.pick(["mean", "sum", "max", "last"]), self.pick(["time", "time", "features"])
        line = Line(f"{how}({x.name}, dim = {dim})")
        self.features.add("reduce")
        self.bind(scope, pool, lines, line, x.width if dim == "time" else 1, alias=False)

    def op_gate(self, scope, pool, lines, x):
        g = self._partner(pool, x)
        line = Line(f"gate({x.name}, {g.name}")
        if self.flag(0.6):
            self.attrs(line, [("act", self.pick(ACT_ATTR), "swiglu", "bad attribute value")])
        line.add(")")
        self.features.add("gate")
        self.bind(scope, pool, lines, line, x.width, alias=False)

    def op_glu(self, scope, pool, lines, x):
        if x.width % 2:
            return self.op_linear(scope, pool, lines, x)
        line = Line(f"glu({x.name}")
        if self.flag(0.6):
            self.attrs(line, [("act", self.pick(ACT_ATTR), "0", "bad attribute value")])
        line.add(")")
        self.features.add("glu")
        self.bind(scope, pool, lines, line, x.width // 2, alias=False)

    def op_split(self, scope, pool, lines, x):
        w = x.width
        equal = [k for k in (2, 3) if w % k == 0]
        if w < 2:
            return self.op_concat(scope, pool, lines, x)
        names = []
        if equal and self.flag(0.4):
            k = self.pick(equal)
            sizes = [w // k] * k
            text = Line(f"split({x.name}, ").mut(str(k), str(w + 1), "bad attribute value").add(")")
        else:
            parts = self.d(st.integers(2, min(3, w)))
            cuts = sorted(self.d(st.lists(st.integers(1, w - 1), min_size=parts - 1, max_size=parts - 1,
                                          unique=True)))
            sizes = [b - a for a, b in zip([0] + cuts, cuts + [w])]
            inner = ", ".join(self.dim(s, scope["env"]) for s in sizes[:-1])
            last = str(sizes[-1])
            text = Line(f"split({x.name}, [{inner}, ").mut(last, str(sizes[-1] + 1), "wrong dimension").add("])")
        for _ in sizes:
            names.append(self.scope_name(scope))
        full = Line(", ".join(names) + " = ")
        full.sites = [(o + len(full.text), *rest) for o, *rest in text.sites]
        full.text += text.text
        lines.append(full)
        pool.extend(T(n, s) for n, s in zip(names, sizes))
        self.features.add("split")

    def op_concat(self, scope, pool, lines, x):
        others = self.d(st.lists(st.sampled_from(self.float_pool(pool)), min_size=0, max_size=2))
        parts = [x] + others
        line = Line("concat(" + ", ".join(t.name for t in parts) + ")")
        self.features.add("concat")
        self.bind(scope, pool, lines, line, sum(t.width for t in parts), alias=False)

    def op_ssm(self, scope, pool, lines, x):
        kind = self.pick(["diag", "dense", "s5", "shift"])
        env = scope["env"]
        if kind in ("diag", "s5"):
            n = 2 * self.d(st.integers(1, 3))
            bad_n = str(n + 1)
        else:
            n = self.d(st.integers(1, 4))
            bad_n = "0"
        line = Line(f"ssm({self.tensor_arg(scope, pool, x)}")
        extra = [("kind", kind, "diagonal", "bad attribute value"),
                 ("d_state", self.dim(n, env), bad_n, "bad attribute value")]
        if kind == "dense":
            extra.append(("init", self.pick(["hippo_legs", "s4d_real", '"hippo-legs"']), "s4d_lin",
                          "bad attribute value"))
        elif kind in ("diag", "s5") and self.flag(0.6):
            extra.append(("init", self.pick(["s4d_lin", "s4d_inv", "s4d_real", "hippo_legs", '"s4d-lin"']),
                          "s4d", "bad attribute value"))
        if self.flag(0.6):
            # forward Euler is unstable for the oscillating modes of diag / s5 (|1 + dt A| > 1): values grow
            # to 1e9 over 64 steps, where the FFT and scan plans differ by rounding alone
            discs = [m for m in SSM_DISC if m != "euler" or kind not in ("diag", "s5")]
            extra.append(("disc", self.pick(discs), "mamba", "bad attribute value"))
        plan = None
        if self.flag(0.4):
            plan = self.pick(["auto", "conv", "scan", "recurrent"])
            extra.append(("plan", plan, "fft", "bad attribute value"))
        if self.flag(0.2):
            extra.append(("dt_min", "0.01", "-0.01", "bad attribute value"))
        if self.flag(0.2):
            extra.append(("dt_max", "0.2", "0.0001", "dt range"))
        self.direction(extra)
        self.attrs(line, extra)
        line.add(")")
        self.features.add(f"ssm-{kind}")
        self._self_or_bind(scope, pool, lines, line, x.width, stateful=True)

    def direction(self, extra):
        """Sometimes `direction = bidirectional` (or the default written out)."""
        if self.flag(0.15):
            extra.append(("direction", "bidirectional", "both", "bad attribute value"))
            self.features.add("bidirectional")
        elif self.flag(0.1):
            extra.append(("direction", "causal", "forward", "bad attribute value"))

    def op_ssd(self, scope, pool, lines, x):
        """Mamba-2's SSD: heads * head_dim = x's width, dt one per head, B and C n_groups * d_state."""
        env = scope["env"]
        d = x.width
        heads = self.pick([k for k in range(1, d + 1) if d % k == 0])
        groups = self.pick([k for k in range(1, heads + 1) if heads % k == 0])
        n = self.d(st.integers(1, 3))
        softplus = self.flag(0.8)
        dt, bc, b, c = (self.scope_name(scope) for _ in range(4))
        if softplus:
            lines.append(Line(f"{dt} = linear({x.name}, {self.dim(heads, env)})"))
        else:   # no softplus: dt + dt_bias stays positive by construction (dt_min = 1: the bias is > 0)
            lines.append(Line(f"{dt} = softplus(linear({x.name}, {self.dim(heads, env)}))"))
        lines.append(Line(f"{bc} = linear({x.name}, {self.dim(2 * groups * n, env)}, bias = false)"))
        lines.append(Line(f"{b}, {c} = split({bc}, 2)"))
        line = Line("ssd(")
        if self.flag(0.5):
            line.add(f"{x.name}, {dt}, {b}, {c}")
        else:
            line.add(f"{x.name}, dt = {dt}, B = {b}, C = {c}")
        extra = [("head_dim", self.dim(d // heads, env), str(d // heads + 1), "wrong dimension"),
                 ("d_state", self.dim(n, env), str(n + 1), "wrong dimension")]
        if groups > 1 or self.flag(0.3):
            extra.append(("n_groups", self.dim(groups, env), "0", "bad attribute value"))
        if self.flag(0.7):      # short chunks: the chunked plan crosses chunk boundaries at fuzzing lengths
            extra.append(("chunk", str(self.d(st.integers(1, 8))), "0", "bad attribute value"))
        if not softplus:
            extra += [("dt_softplus", "false", "no", "bad attribute value"),
                      ("dt_min", "1.0", "-1.0", "bad attribute value"), ("dt_max", "2.0", "0.5", "dt range")]
        elif self.flag(0.2):
            extra.append(("dt_max", "0.05", "0.0001", "dt range"))
        if self.flag(0.4):
            extra.append(("plan", self.pick(["auto", "scan", "recurrent"]), "conv", "bad attribute value"))
        self.attrs(line, extra)
        line.add(")")
        pool.extend([T(dt, heads), T(b, groups * n), T(c, groups * n)])
        self.features.add("ssd")
        self._self_or_bind(scope, pool, lines, line, d, stateful=True)

    def op_gated_rmsnorm(self, scope, pool, lines, x):
        z = self._partner(pool, x)
        w = x.width
        line = Line(f"gated_rmsnorm({x.name}, {z.name}")
        extra = []
        if self.flag(0.6):
            g = self.pick([k for k in range(1, w + 1) if w % k == 0])
            extra.append(("groups", self.dim(g, scope["env"]), str(w + 1), "wrong dimension"))
        if self.flag(0.4):
            extra.append(("eps", self.pick(["1e-5", "0.001"]), "-1e-5", "bad attribute value"))
        self.attrs(line, extra)
        line.add(")")
        self.features.add("gated_rmsnorm")
        self.bind(scope, pool, lines, line, w)

    def op_gla(self, scope, pool, lines, x):
        """Gated / fixed-decay / plain linear attention; key and value widths per head."""
        env = scope["env"]
        w = x.width
        heads = self.d(st.integers(1, 3))
        extra = []
        for key in ("key_dim", "value_dim"):
            if w % heads == 0 and self.flag(0.4):
                continue                       # 0: the input width
            extra.append((key, self.dim(heads * self.d(st.integers(1, 3)), env),
                          *((str(heads * 4 + 1), "wrong dimension") if heads > 1 else ("-1", "bad attribute value"))))
        decay = self.pick(["gated", "fixed", "none"])
        if decay != "gated" or self.flag(0.5):
            extra.append(("decay", decay, "retnet", "bad attribute value"))
        if decay == "gated":
            if self.flag(0.6):
                extra.append(("gate_rank", self.dim(self.d(st.integers(1, 4)), env), "0", "bad attribute value"))
            if self.flag(0.3):
                extra.append(("gate_normalizer", self.pick(["1.0", "4.0", "16"]), "0", "bad attribute value"))
        if self.flag(0.4):
            extra.append(("plan", self.pick(["auto", "scan", "recurrent"]), "conv", "bad attribute value"))
        line = Line(f"gla({self.tensor_arg(scope, pool, x)}, heads = ")
        line.mut(self.dim(heads, env), "0", "bad attribute value")
        self.attrs(line, extra)
        line.add(")")
        self.features.add(f"gla-{decay}")
        self._self_or_bind(scope, pool, lines, line, w, stateful=True)

    def op_rglru(self, scope, pool, lines, x):
        """Griffin's RG-LRU: heads divide the width; reset on or off; causal or bidirectional."""
        w = x.width
        heads = self.pick([k for k in range(1, w + 1) if w % k == 0])
        line = Line(f"rglru({self.tensor_arg(scope, pool, x)}")
        extra = []
        if heads > 1 or self.flag(0.3):
            extra.append(("heads", self.dim(heads, scope["env"]), str(w + 1), "wrong dimension"))
        if self.flag(0.3):
            extra.append(("c", self.pick(["8.0", "2.0", "1"]), "-8.0", "bad attribute value"))
        reset = self.flag(0.7)
        if not reset or self.flag(0.3):
            extra.append(("reset", "true" if reset else "false", "2", "bad attribute value"))
        if self.flag(0.4):
            extra.append(("plan", self.pick(["auto", "scan", "recurrent"]), "conv", "bad attribute value"))
        self.direction(extra)
        self.attrs(line, extra)
        line.add(")")
        self.features.add("rglru" + ("" if reset else "-noreset"))
        self._self_or_bind(scope, pool, lines, line, w, stateful=True)

    def _self_or_bind(self, scope, pool, lines, line, width, stateful):
        if scope["depth"] > 0 and not scope["self"] and self.flag(0.5):
            scope["self"] = True
            line.add(" as self")
            self.features.add("as-self")
            name = self.scope_name(scope)
            full = Line(f"{name} = ")
            full.sites = [(o + len(full.text), *rest) for o, *rest in line.sites]
            full.text += line.text
            lines.append(full)
            t = T(name, width)
            pool.append(t)
            return t
        return self.bind(scope, pool, lines, line, width)

    def op_selective_ssm(self, scope, pool, lines, x):
        env = scope["env"]
        d, n = x.width, self.d(st.integers(1, 4))
        softplus = self.flag(0.8)
        dt = self.scope_name(scope)
        bc = self.scope_name(scope)
        b, c = self.scope_name(scope), self.scope_name(scope)
        if softplus:
            lines.append(Line(f"{dt} = linear({x.name}, {self.dim(d, env)})"))
        else:   # without the softplus the step must stay positive by construction
            lines.append(Line(f"{dt} = softplus(linear({x.name}, {self.dim(d, env)}))"))
        lines.append(Line(f"{bc} = linear({x.name}, {self.dim(2 * n, env)}, bias = false)"))
        lines.append(Line(f"{b}, {c} = split({bc}, 2)"))
        z = self.choose(pool, lambda t: t.width == d) if self.flag(0.5) else None
        line = Line("selective_ssm(")
        if self.flag(0.5):
            line.add(f"{x.name}, {dt}, {b}, {c}" + (f", {z.name}" if z else ""))
        else:
            line.add(f"{x.name}, delta = {dt}, B = {b}, C = {c}" + (f", z = {z.name}" if z else ""))
        extra = [("d_state", self.dim(n, env), str(n + 1), "wrong dimension")]
        if self.flag(0.5):   # without the softplus a learned bias (about log dt < 0) could make the step negative
            extra.append(("delta_bias", self.pick(["true", "false"]) if softplus else "false", "1",
                          "bad attribute value"))
        if not softplus or self.flag(0.2):
            extra.append(("delta_softplus", "true" if softplus else "false", "no", "bad attribute value"))
        if self.flag(0.5):
            extra.append(("disc", self.pick(SEL_DISC), "euler", "bad attribute value"))
        if self.flag(0.3):
            extra.append(("plan", self.pick(["auto", "scan", "recurrent"]), "conv", "illegal plan"))
        if self.flag(0.2):
            extra.append(("dt_max", "0.05", "0.0001", "dt range"))
        self.direction(extra)
        self.attrs(line, extra)
        if not any(key == "plan" for key, *_ in extra):
            line.mut("", ", plan = conv", "illegal plan")      # an insertion
        line.add(")")
        # an illegal plan is caught when planning (compile), not by build_graph
        line.sites = [(o, old, new, kind, "compile" if kind == "illegal plan" else stage)
                      for o, old, new, kind, stage in line.sites]
        pool.extend([T(dt, d), T(b, n), T(c, n)])
        self.features.add("selective_ssm" + ("-z" if z else ""))
        self._self_or_bind(scope, pool, lines, line, d, stateful=True)

    def op_lstm(self, scope, pool, lines, x):
        """lstm, or gru where the registry has it (the same attributes)."""
        rnn = self.pick(RNNS)
        h = self.d(st.integers(1, 6))
        line = Line(f"{rnn}({x.name}, ")
        line.mut(self.dim(h, scope["env"]), "0", "bad attribute value")
        extra = []
        if self.flag(0.5):
            extra.append(("layers", str(self.d(st.integers(1, 3))), "0", "bad attribute value"))
        if self.flag(0.3):
            extra.append(("bias", self.pick(["true", "false"]), "3", "bad attribute value"))
        if self.flag(0.2):
            extra.append(("plan", self.pick(["auto", "recurrent"]), "conv", "bad attribute value"))
        self.attrs(line, extra)
        line.add(")")
        self.features.add(rnn)
        self._self_or_bind(scope, pool, lines, line, h, stateful=True)

    def op_attention(self, scope, pool, lines, x):
        """Multi-head attention: grouped-query (kv_heads), an explicit head_dim, rotary (rope), a
        sliding window, or bidirectional (causal = false: no step, no streaming)."""
        w, env = x.width, scope["env"]
        h = self.pick(range(1, 5)) if self.flag(0.3) else self.pick([k for k in range(1, w + 1) if w % k == 0])
        rope = self.flag(0.3)
        # head_dim: 0 (= w / heads) where heads divide w, else explicit (even with rope)
        hd = w // h if w % h == 0 and not self.flag(0.3) else 0
        explicit = hd == 0 or (rope and hd % 2)
        if explicit:
            hd = 2 * self.d(st.integers(1, 2)) if rope else self.d(st.integers(1, 4))
        line = Line(f"attention({x.name}, ")
        if explicit:
            line.add("heads = ").mut(self.dim(h, env), "0", "bad attribute value")
        else:
            line.add("heads = ").mut(self.dim(h, env), str(w + 1), "wrong dimension")
        extra = []
        if explicit:
            extra.append(("head_dim", self.dim(hd, env), "-1", "bad attribute value"))
        elif self.flag(0.2):
            extra.append(("head_dim", "0", "-1", "bad attribute value"))
        if self.flag(0.4):
            kv = self.pick([k for k in range(1, h + 1) if h % k == 0])
            extra.append(("kv_heads", self.dim(kv, env), str(h + 1), "wrong dimension"))
        if rope:
            extra.append(("rope", "true", "1", "bad attribute value"))
            if self.flag(0.3):
                extra.append(("rope_theta", self.pick(["100.0", "10000.0", "500000"]), "0", "bad attribute value"))
        causal = not self.flag(0.15)
        if not causal:
            extra.append(("causal", "false", "0", "bad attribute value"))
            self.features.add("bidirectional")
        elif self.flag(0.4):
            extra.append(("window", str(self.d(st.integers(1, 4))), "-1", "bad attribute value"))
            self.features.add("attention-window")
        if self.flag(0.3):
            extra.append(("bias", self.pick(["true", "false"]), "2", "bad attribute value"))
        self.attrs(line, extra)
        line.add(")")
        self.features.add("attention")
        for key, value, *_ in extra:
            self.features.add(f"attention-{key}")
        self._self_or_bind(scope, pool, lines, line, w, stateful=True)

    # -- blocks ------------------------------------------------------------------------------
    def op_embedding(self, scope, pool, lines, x):
        """Another embedding of the token input (a model may read its tokens several times)."""
        tokens = next(t for t in pool if t.width is None)
        dim, vocab = self.d(st.integers(1, 6)), self.d(st.integers(2, 9))
        line = Line(f"embedding({tokens.name}, ").mut(str(vocab), "1.5", "bad attribute value")
        line.add(f", {self.dim(dim, scope['env'])})")
        self.features.add("embedding-again")
        t = self.bind(scope, pool, lines, line, dim)
        t.weight, t.layer = (vocab, dim), "embedding"

    def op_std_block(self, scope, pool, lines, x):
        w = x.width
        env = scope["env"]
        which = self.pick(["MambaBlock", "MambaMixer", "AttentionBlock", "MLPBlock", "TransformerBlock",
                           "GatedMLP"])
        heads = [k for k in range(1, w + 1) if w % k == 0]
        if which.startswith("Mamba"):
            scope["file"].include("std/mamba_block.seq")
            args = [("d_model", self.dim(w, env))]
            if self.flag(0.7):
                args.append(("d_state", str(self.d(st.integers(1, 4)))))
            if self.flag(0.5):
                args.append(("expand", str(self.d(st.integers(1, 2)))))
            if self.flag(0.5):
                args.append(("d_conv", str(self.d(st.integers(1, 4)))))
            if self.flag(0.3):
                args.append(("dt_rank", str(self.d(st.integers(1, 3)))))
        else:
            scope["file"].include("std/transformer_block.seq")
            args = [("d_model", self.dim(w, env))]
            if which in ("AttentionBlock", "TransformerBlock"):
                args.append(("n_heads", str(self.pick(heads))))
            if which != "AttentionBlock" and self.flag(0.5):
                args.append(("mult", str(self.d(st.integers(1, 2)))))
        self.features.add(f"std-{which}")
        line = Line(f"{which}({x.name}")
        for k, v in args:
            if k == "d_model":
                line.add(", d_model = ").mut(v, str(w + 1), "wrong dimension")
            else:
                line.add(f", {k} = {v}")
        line.add(")")
        if which not in ("MambaMixer", "GatedMLP") and self.flag(0.3):
            n = self.d(st.integers(1, 2))
            name = self.scope_name(scope)
            full = Line(f"{name} = repeat(")
            full.mut(self.pick([str(n), f"{2 * n} / 2"]), "-1", "bad attribute value").add(") ")
            full.sites += [(o + len(full.text), *rest) for o, *rest in line.sites]
            full.text += line.text + f" as {name}_rep"
            lines.append(full)
            pool.append(T(name, w))
            self.features.add("repeat")
            return
        self.bind(scope, pool, lines, line, w)

    def op_block(self, scope, pool, lines, x):
        """Call a block for the width of `x`: one defined before (reuse) or a new one, placed in
        this file or a later sibling file."""
        w = x.width
        here = self.order.index(scope["file"].name)
        reuse = [b for b in self.blocks if b["w"] == w and self.order.index(b["file"]) >= here
                 and b["depth"] >= scope["depth"]]
        repeat = self.flag(0.3)
        n_rep = self.d(st.integers(0, 2)) if repeat else 1
        if reuse and self.flag(0.5):
            blk = self.pick(reuse)
            if blk["file"] != scope["file"].name:
                scope["file"].include(blk["file"])
            self.features.add("block-reused")
            if repeat and (blk["out"] != w or blk["inputs"] != 1 or blk["second"] is not None):
                repeat, n_rep = False, 1
        else:
            blk = self.define_block(scope, w, here, repeat, n_rep)
        y = self._partner(pool, x) if blk["inputs"] == 2 else None
        call = Line().mut(blk["name"], blk["name"] + "x", "unknown name").add(f"({x.name}, ")
        if y is not None:
            call.add(f"{y.name}, ")
        call.mut("d", "dim", "unknown name").add(" = ").mut(self.dim(w, scope["env"]), str(w + 1), "wrong dimension")
        for pname, v in blk["params"]:
            if self.flag(0.3):
                call.add(f", {pname} = {self.dim(v, scope['env'])}")
        call.add(")")
        if repeat:
            if n_rep == 0:          # the block is never elaborated: only its name is looked up
                call.sites = call.sites[:1]
                self.features.add("repeat-0")
            name = self.scope_name(scope)
            full = Line(f"{name} = repeat(")
            full.mut(self.pick([str(n_rep), f"{n_rep + 1} - 1", f"{2 * n_rep} / 2", f"{n_rep}.0"]), "-1",
                     "bad attribute value").alt("1 / 2", "bad attribute value").add(") ")
            full.sites += [(o + len(full.text), *rest) for o, *rest in call.sites]
            full.text += call.text + f" as {name}_rep"
            lines.append(full)
            pool.append(T(name, w))
            self.features.add("repeat")
        elif blk["second"] is not None:
            a, b = self.scope_name(scope), self.scope_name(scope)
            full = Line(f"{a}, {b} = ")
            full.sites = [(o + len(full.text), *rest) for o, *rest in call.sites]
            full.text += call.text
            lines.append(full)
            pool.extend([T(a, blk["out"]), T(b, blk["second"])])
            self.features.add("block-two-outputs")
        else:
            self.bind(scope, pool, lines, call, blk["out"])

    def define_block(self, scope, w, here, repeat, n_rep):
        k = self.d(st.integers(here, min(here + 1, 2)))
        if k >= len(self.order):
            name = f"lib{len(self.order)}.seq"
            self.files[name] = File(name)
            self.order.append(name)
            self.features.add("sibling-file")
        target = self.files[self.order[k]]
        if target is not scope["file"]:
            scope["file"].include(target.name)
        self.n_blocks += 1
        bname = f"Blk{self.n_blocks}"
        two_outputs = not repeat and self.flag(0.2)
        two_inputs = not repeat and self.flag(0.2)
        # parameters: the width, then a few with defaults (some computed from earlier ones)
        env = {"d": w}
        params = ["d"]
        extra = []
        for i in range(self.d(st.integers(0, 2))):
            v = self.d(st.integers(1, 8))
            pname = f"p{i}"
            params.append(f"{pname} = {self.dim(v, dict(env))}")
            env[pname] = v
            extra.append((pname, v))
        self.features.add("block")
        inner = {"env": dict(env), "n": 0, "depth": scope["depth"] + 1, "self": False, "file": target, "used": set(),
                 "dead": scope["dead"] or n_rep == 0}
        bl: list[Line] = []
        # the input's width is written through `d`, so a call passing another d is wrong
        width = self.pick(["d", "d * 1", "2 * d // 2", "d + 0", "max(d, 1)", "d ** 1"])
        bl.append(Line("input x: [B, L, ").mut(width, str(w + 1), "wrong dimension").add("]"))
        bpool = [T("x", w)]
        if two_inputs:
            bl.append(Line(f"input y: [B, L, {self.dim(w, env)}]"))
            bpool.append(T("y", w))
            self.features.add("block-two-inputs")
        self.body(inner, bpool, self.d(st.integers(1, 3)), bl)
        last = bpool[-1]
        if repeat or self.flag(0.4):
            if last.width == w and self.flag(0.5):
                ret = Line(f"return x + {last.name}")
            else:
                proj = self.scope_name(inner)
                bl.append(Line(f"{proj} = linear({last.name}, d)"))
                ret = Line(f"return {proj}" + (" + x" if self.flag(0.5) else ""))
            out_w = w
        else:
            ret = Line(f"return {last.name}")
            out_w = last.width
        second = None
        if two_outputs:
            second = self.pick(self.float_pool(bpool))
            ret.add(f", {second.name}")
        bl.append(ret)
        if inner["dead"]:
            for line in bl:
                line.sites = []
        header = Line(f"block {bname}({', '.join(params)}) {{")
        target.items.append([header] + bl + [Line("}")])
        blk = {"name": bname, "w": w, "out": out_w, "second": second.width if second else None,
               "inputs": 2 if two_inputs else 1, "params": extra, "file": target.name, "depth": scope["depth"]}
        if not inner["dead"]:
            self.blocks.append(blk)
        return blk

    # -- the model ------------------------------------------------------------------------------------
    def model(self) -> Spec:
        main = self.files[MAIN]
        self.long_names = self.flag(0.15)
        if self.long_names:
            self.features.add("long-names")
        env: dict[str, int] = {}
        params = []
        d_model = self.d(st.integers(1, 8), label="d_model")
        env["d_model"] = d_model
        params.append(f"d_model = {d_model}")
        for i in range(self.d(st.integers(0, 2))):
            v = self.d(st.integers(1, 8))
            params.append(f"h{i} = {self.dim(v, dict(env))}")
            env[f"h{i}"] = v
        scope = {"env": env, "n": 0, "depth": 0, "self": False, "file": main, "used": set(), "dead": False}
        bsym, lsym = self.pick([("B", "L"), ("batch", "time"), ("N", "T")])
        lines: list[Line] = []
        pool: list[T] = []
        inputs = []
        tokens = self.flag(0.25)
        if tokens:
            vocab = self.d(st.integers(2, 9))
            lines.append(Line(f"input tokens: [{bsym}, {lsym}] int"))
            inputs.append(("tokens", None))
            emb = self.scope_name(scope)
            line = Line("embedding(tokens, vocab = ").mut(str(vocab), "0", "bad attribute value")
            line.add(", dim = ").mut(self.dim(d_model, env), "-2", "bad attribute value").add(")")
            t = self.bind(scope, pool, lines, line, d_model)
            t.weight, t.layer = (vocab, d_model), "embedding"
            self.features.add("embedding")
        else:
            line = Line(f"input x: [{bsym}, {lsym}, ").mut(self.dim(d_model, env), "0", "wrong dimension").add("]")
            lines.append(line)
            pool.append(T("x", d_model))
            inputs.append(("x", d_model))
        if self.flag(0.25):
            w2 = self.d(st.integers(1, 6))
            lines.append(Line(f"input y: [{bsym}, {lsym}, {self.dim(w2, env)}]"))
            pool.append(T("y", w2))
            inputs.append(("y", w2))
            self.features.add("two-inputs")
        self.body(scope, pool, self.d(st.integers(1, 5), label="statements"), lines)
        floats = self.float_pool(pool)
        outs = [floats[-1]]
        if self.flag(0.25):
            outs.append(self.pick(floats))
            self.features.add("two-outputs")
        ret = Line("return ").mut(outs[0].name, outs[0].name + "_missing", "unknown name")
        for o in outs[1:]:
            ret.add(f", {o.name}")
        lines.append(ret)
        main.items.insert(0, [Line(f"model M({', '.join(params)}) {{")] + lines + [Line("}")])
        return self.render(inputs, env)

    def render(self, inputs, params) -> Spec:
        texts, sites = {}, []
        for name in self.order:
            f = self.files[name]
            out: list[str] = [f'include "{p}"' for p in f.includes]
            for item in f.items:
                if out:
                    out.append("")
                for k, line in enumerate(item):
                    indent = "  " if 0 < k < len(item) - 1 else ""
                    for off, old, new, kind, stage in line.sites:
                        sites.append(Site(name, len(out) + 1, off + len(indent), old, new, kind, stage))
                    text = indent + line.text
                    if k and k < len(item) - 1 and self.flag(0.05):
                        text += "   # a comment"
                    out.append(text)
            texts[name] = "\n".join(out) + "\n"
        return Spec(texts, inputs, sites, frozenset(self.features), dict(params))


@st.composite
def specs(draw) -> Spec:
    """A random valid .seq program (see the module docstring)."""
    return Gen(draw).model()



def noisy(text: str, choices) -> str:
    """The same program laid out differently: inside brackets some argument separators become
    line breaks or extra spaces, some calls and lists get a trailing comma, and some statements
    get a blank line before them.  `choices` yields small ints (drawn by the caller)."""
    out, stack = [], []
    for line in text.split("\n"):
        buf: list[str] = []
        for i, ch in enumerate(line):
            if ch == "#" and not stack:
                buf.append(line[i:])
                break
            if ch in "([":
                prev = "".join(buf).rstrip()
                # a call or a list takes a trailing comma; repeat(...), input [...] and grouping parens do not
                named = prev[-1:].isalnum() or prev[-1:] == "_"
                trailing = (ch == "[" and not prev.endswith(":")) or (named and not prev.endswith("repeat"))
                stack.append(trailing)
                buf.append(ch)
            elif ch in ")]":
                trailing = stack.pop() if stack else False
                if trailing and buf and buf[-1] not in "([" and next(choices) == 1:
                    buf.append(",")
                buf.append(ch)
            elif ch == " " and stack and buf and buf[-1] == ",":
                c = next(choices)
                buf.append("\n        " if c == 1 else "   " if c == 2 else " ")
            else:
                buf.append(ch)
        if line.startswith("  ") and next(choices) == 1:
            out.append("")
        out.append("".join(buf))
    return "\n".join(out)
