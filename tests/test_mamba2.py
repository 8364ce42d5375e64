"""Mamba-2 / SSD (seqc/ops/ssd.py, seqc/ops/gated_norm.py, backends/torch/ops/ssd.py,
std/mamba2_block.seq, seqc/interop/families/mamba2.py).

References: transformers' Mamba2ForCausalLM built tiny from a config (whole-model
logits, greedy decoding token by token through seqc's step API) and its
reference SSD functions (``mamba2_chunk_scan``, ``mamba2_selective_state_update``,
``MambaRMSNormGated``) for the NumPy oracle.  transformers computes the SSD and
the norms in float32 even after ``.double()``, so comparisons with it allow
1e-5 relative (measured ~3e-7); seqc's own plans and backends agree to ~1e-12.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import seqc
from conftest import assert_agree, example
from seqc.backends.numpy import ops as np_ops
from seqc.backends.torch.base import LAYERS
from seqc.interop.families import mamba2 as family

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, Mamba2Config, Mamba2ForCausalLM  # noqa: E402
from transformers.models.mamba2 import modeling_mamba2 as hf  # noqa: E402

HF_TOL = 1e-5


def _config(n_groups, **kw):
    base = dict(num_heads=4, head_dim=8, hidden_size=16, expand=2, state_size=8, n_groups=n_groups,
                num_hidden_layers=2, vocab_size=40, chunk_size=8, conv_kernel=4, layer_norm_epsilon=1e-3)
    return Mamba2Config(**{**base, **kw})


def _reference(cfg, seed=0):
    """A tiny transformers Mamba2ForCausalLM in float64 with D, dt_bias and the norm weights
    moved off their initial values (so a swapped or ignored parameter shows)."""
    torch.manual_seed(seed)
    ref = Mamba2ForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith((".D", "dt_bias", "norm.weight", "A_log")):
                p.add_(0.3 * torch.randn_like(p))
    return ref


def _ours(ref, cfg, tmp_path):
    """seqc's model for the same checkpoint: spec_for_config + convert_state_dict, loaded strictly
    from what save_pretrained wrote."""
    from safetensors.torch import load_file
    ref.save_pretrained(tmp_path)
    config = cfg.to_dict()
    model = seqc.compile(family.spec_for_config(config), backend="torch").double()
    model.load_state_dict(family.convert_state_dict(load_file(tmp_path / "model.safetensors"), config), strict=True)
    return model


def _flat(state, prefix=""):
    """A model's nested state dict as {dotted name: tensor}."""
    out = {}
    for k, v in state.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _ssd_pair_inputs(rng, b=2, L=13, H=4, P=3, G=2, N=5):
    return (rng.standard_normal((b, L, H * P)), rng.standard_normal((b, L, H)),
            rng.standard_normal((b, L, G * N)), rng.standard_normal((b, L, G * N)))


def _params(rng, H):
    return {"A_log": rng.uniform(-1.0, 1.0, H), "dt_bias": rng.standard_normal(H), "D": rng.standard_normal(H)}


def _layer(H, P, G, N, chunk, p, plan="scan"):
    layer = LAYERS["ssd"]([H * P, H, G * N, G * N], dict(head_dim=P, d_state=N, n_groups=G, chunk=chunk,
                                                          plan=plan)).double()
    layer.load_state_dict({k: torch.as_tensor(v) for k, v in p.items()})
    return layer


# -- whole model against transformers ----------------------------------------------------------


@pytest.mark.parametrize("n_groups", [1, 2])
def test_logits_match_transformers_mamba2(n_groups, tmp_path):
    cfg = _config(n_groups)
    ref = _reference(cfg, seed=n_groups)
    ours = _ours(ref, cfg, tmp_path)
    tokens = torch.randint(0, cfg.vocab_size, (2, 21), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ref(tokens).logits
        assert_agree(expected, ours(tokens), HF_TOL, "logits")
        ours.eval()
        # the recurrence plan computes the same logits
        rec = seqc.compile(family.spec_for_config(cfg.to_dict()), backend="torch", mode="recurrent").double()
        rec.load_state_dict(ours.state_dict())
        assert_agree(ours(tokens), rec(tokens), 1e-12, "scan vs recurrent plan")


@pytest.mark.parametrize("n_groups", [1, 2])
def test_greedy_decoding_token_by_token_matches_transformers(n_groups, tmp_path):
    cfg = _config(n_groups, num_heads=8, head_dim=4)
    ref = _reference(cfg, seed=10 + n_groups)
    ours = _ours(ref, cfg, tmp_path)
    prompt = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(7))
    new = 16
    with torch.no_grad():
        # transformers' per-token decoding: prefill into its cache, then one token at a time through
        # its recurrent path (causal_conv1d_update + selective_state_update)
        cache = DynamicCache(config=cfg)
        y_ref = ref(prompt, cache=cache, use_cache=True).logits[:, -1]
        expected, ref_logits = prompt[0].tolist(), []
        for _ in range(new):
            expected.append(int(y_ref.argmax(-1)))
            ref_logits.append(y_ref)
            y_ref = ref(torch.tensor([[expected[-1]]]), cache=cache, use_cache=True).logits[:, -1]
        state, tokens = ours.init_state(1), prompt[0].tolist()
        logits = []
        for t in tokens:
            y, state = ours.step(torch.tensor([t]), state)
        for _ in range(new):
            tokens.append(int(y.argmax(-1)))
            logits.append(y)
            y, state = ours.step(torch.tensor([tokens[-1]]), state)
        assert tokens == expected
        assert_agree(torch.cat(ref_logits), torch.cat(logits), HF_TOL, "per-token logits")
        # step logits are the forward logits of the generated sequence
        full = ours(torch.tensor([tokens]))
        assert_agree(full[0, prompt.shape[1] - 1:-1], torch.cat(logits), 1e-12, "step vs forward")


def test_state_carries_across_calls_and_lengths(tmp_path):
    cfg = _config(2)
    ours = _ours(_reference(cfg), cfg, tmp_path)
    tokens = torch.randint(0, cfg.vocab_size, (3, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, state = ours(tokens, return_state=True)
        a, s = ours(tokens[:, :7], return_state=True)
        b, s = ours(tokens[:, 7:], state=s, return_state=True)
        assert_agree(full, torch.cat([a, b], 1), 1e-12, "split call")
        state, s = _flat(state), _flat(s)
        assert any(k.endswith("ssm") for k in state) and any(k.endswith("window") for k in state)
        for k in state:
            assert_agree(state[k], s[k], 1e-12, k)
        lengths = torch.tensor([19, 4, 11])
        y, st = ours(tokens, lengths=lengths, return_state=True)
        st = _flat(st)
        for i, n in enumerate(lengths.tolist()):
            alone, st_i = ours(tokens[i:i + 1, :n], return_state=True)
            st_i = _flat(st_i)
            assert_agree(alone[0], y[i, :n], 1e-12, f"row {i} output")
            for k in st:
                assert_agree(st_i[k][0], st[k][i], 1e-12, f"row {i} state {k}")


# -- the NumPy oracle against transformers' reference functions ----------------------------------


@pytest.mark.parametrize("plan", ["recurrent", "scan"])
def test_numpy_oracle_matches_transformers_chunk_scan(plan, rng):
    b, L, H, P, G, N = 2, 13, 4, 3, 2, 5
    x, dt, B, C = _ssd_pair_inputs(rng, b, L, H, P, G, N)
    p = _params(rng, H)
    h0 = rng.standard_normal((b, H, P, N))
    y, st = np_ops.ssd(x, dt, B, C, p=p, state={"ssm": h0}, plan=plan, head_dim=P, d_state=N, n_groups=G, chunk=4)
    T = {k: torch.as_tensor(v) for k, v in p.items()}
    y_ref, h_ref = hf.mamba2_chunk_scan(torch.as_tensor(x).view(b, L, H, P), torch.as_tensor(dt),
                                        -torch.exp(T["A_log"]), torch.as_tensor(B).view(b, L, G, N),
                                        torch.as_tensor(C).view(b, L, G, N), chunk_size=5, D=T["D"],
                                        dt_bias=T["dt_bias"], dt_softplus=True, initial_states=torch.as_tensor(h0),
                                        return_final_states=True)
    assert_agree(y_ref.reshape(b, L, H * P), y, HF_TOL, "output")
    assert_agree(h_ref, st["ssm"], HF_TOL, "final state")


def test_numpy_step_matches_transformers_state_update(rng):
    b, H, P, G, N = 2, 4, 3, 2, 5
    x, dt, B, C = (a[:, 0] for a in _ssd_pair_inputs(rng, b, 1, H, P, G, N))
    p = _params(rng, H)
    h0 = rng.standard_normal((b, H, P, N))
    y, st = np_ops.ssd_step(x, dt, B, C, p=p, state={"ssm": h0}, head_dim=P, d_state=N, n_groups=G)
    state = torch.as_tensor(h0).clone()
    T = {k: torch.as_tensor(v) for k, v in p.items()}
    y_ref = hf.mamba2_selective_state_update(
        state, torch.as_tensor(x).view(b, H, P), torch.as_tensor(dt)[..., None].expand(b, H, P),
        (-torch.exp(T["A_log"]))[:, None, None].expand(H, P, N), torch.as_tensor(B).view(b, G, N),
        torch.as_tensor(C).view(b, G, N), T["D"][:, None].expand(H, P),
        dt_bias=T["dt_bias"][:, None].expand(H, P), dt_softplus=True)
    assert_agree(y_ref.reshape(b, H * P), y, HF_TOL, "output")
    assert_agree(state, st["ssm"], HF_TOL, "state")


def test_gated_norm_matches_transformers(rng):
    x, z = rng.standard_normal((2, 5, 12)), rng.standard_normal((2, 5, 12))
    w = rng.standard_normal(12)
    ref = hf.MambaRMSNormGated(12, group_size=4, eps=1e-3).double()
    with torch.no_grad():
        ref.weight.copy_(torch.as_tensor(w))
        expected = ref(torch.as_tensor(x), torch.as_tensor(z))
    assert_agree(expected, np_ops.gated_rmsnorm(x, z, p={"weight": w}, groups=3, eps=1e-3), HF_TOL, "numpy")
    layer = LAYERS["gated_rmsnorm"]([12, 12], {"groups": 3, "eps": 1e-3}).double()
    layer.load_state_dict({"weight": torch.as_tensor(w)})
    assert_agree(np_ops.gated_rmsnorm(x, z, p={"weight": w}, groups=3, eps=1e-3),
                 layer(torch.as_tensor(x), torch.as_tensor(z)), 1e-13, "torch")


def test_oracle_plans_agree_and_match_a_scalar_hand_recurrence(rng):
    """One head, head_dim 1, d_state 1: h_t = exp(dt_t a) h + dt_t x_t B_t, y = C_t h + D x_t by hand."""
    L = 11
    x, dt, B, C = (rng.standard_normal((1, L, 1)) for _ in range(4))
    p = {"A_log": np.array([0.4]), "dt_bias": np.array([0.2]), "D": np.array([0.7])}
    d = np.log1p(np.exp(dt[0, :, 0] + 0.2))
    a = -math.exp(0.4)
    h, expected = 0.0, []
    for t in range(L):
        h = math.exp(d[t] * a) * h + d[t] * x[0, t, 0] * B[0, t, 0]
        expected.append(C[0, t, 0] * h + 0.7 * x[0, t, 0])
    for plan in ("recurrent", "scan"):
        y, st = np_ops.ssd(x, dt, B, C, p=p, plan=plan, head_dim=1, d_state=1, chunk=3)
        assert_agree(np.array(expected), y[0, :, 0], 1e-13, plan)
        assert abs(st["ssm"][0, 0, 0, 0] - h) < 1e-13


# -- the torch layer: chunked plan against the recurrence ---------------------------------------


@pytest.mark.parametrize("L, chunk, G", [(16, 4, 1), (23, 8, 2), (5, 16, 4), (1, 4, 2)])
def test_chunked_plan_equals_recurrence_values_and_gradients(L, chunk, G, rng):
    b, H, P, N = 2, 4, 3, 5
    x, dt, B, C = _ssd_pair_inputs(rng, b, L, H, P, G, N)
    p = _params(rng, H)
    h0 = rng.standard_normal((b, H, P, N))
    outs = {}
    for plan in ("scan", "recurrent"):
        layer = _layer(H, P, G, N, chunk, p, plan)
        ins = [torch.tensor(a, requires_grad=True) for a in (x, dt, B, C, h0)]
        y, st = layer(*ins[:4], state={"ssm": ins[4]}, return_state=True)
        w = torch.as_tensor(rng.standard_normal(y.shape)) if not outs else outs["w"]
        loss = (y * w).sum() + (st["ssm"] ** 2).sum()
        grads = torch.autograd.grad(loss, ins + list(layer.parameters()))
        outs.setdefault("w", w)
        outs[plan] = (y, st["ssm"], grads)
    (y1, s1, g1), (y2, s2, g2) = outs["scan"], outs["recurrent"]
    assert_agree(y2, y1, 1e-10, "output")
    assert_agree(s2, s1, 1e-10, "final state")
    for a, c in zip(g2, g1):
        assert_agree(a, c, 1e-10, "gradient")
    # and both equal the NumPy oracle
    y_np, st_np = np_ops.ssd(x, dt, B, C, p=p, state={"ssm": h0}, plan="recurrent", head_dim=P, d_state=N,
                             n_groups=G)
    assert_agree(y_np, y1, 1e-12, "numpy output")
    assert_agree(st_np["ssm"], s1, 1e-12, "numpy state")


def test_step_equals_forward_and_lengths_stop_the_state(rng):
    b, L, H, P, G, N = 3, 9, 4, 2, 2, 3
    x, dt, B, C = _ssd_pair_inputs(rng, b, L, H, P, G, N)
    layer = _layer(H, P, G, N, 4, _params(rng, H))
    T = [torch.as_tensor(a) for a in (x, dt, B, C)]
    y, st = layer(*T, return_state=True)
    state, ys = layer.init_state(b, torch.float64), []
    for t in range(L):
        y_t, state = layer.step(*(a[:, t] for a in T), state=state)
        ys.append(y_t)
    assert_agree(y, torch.stack(ys, 1), 1e-12, "step vs forward")
    assert_agree(st["ssm"], state["ssm"], 1e-12, "state")
    lengths = torch.tensor([9, 0, 5])
    y_l, st_l = layer(*T, lengths=lengths, return_state=True)
    for i, n in enumerate(lengths.tolist()):
        alone, st_i = layer(*(a[i:i + 1, :n] for a in T), return_state=True)
        assert_agree(alone[0], y_l[i, :n], 1e-12, f"row {i}")
        assert_agree(st_i["ssm"][0], st_l["ssm"][i], 1e-12, f"row {i} state")


def test_float32_chunked_plan_close_to_float64(rng):
    b, L, H, P, G, N = 2, 40, 4, 8, 2, 8
    x, dt, B, C = _ssd_pair_inputs(rng, b, L, H, P, G, N)
    p = _params(rng, H)
    y64 = _layer(H, P, G, N, 16, p)(*(torch.as_tensor(a) for a in (x, dt, B, C)))
    y32 = _layer(H, P, G, N, 16, p).float()(*(torch.as_tensor(a, dtype=torch.float32) for a in (x, dt, B, C)))
    assert y32.dtype == torch.float32
    assert_agree(y64, y32, 1e-5, "float32")


# -- compiler: difftest, planner, errors, interop refusals --------------------------------------


@pytest.mark.parametrize("modes", [("auto", "auto"), ("scan", "recurrent"), ("recurrent", "scan")])
def test_difftest_numpy_vs_torch(modes):
    report = seqc.difftest(open(example("mamba2.seq")).read(), modes=modes, length=19, tolerance=1e-10)
    assert report.ok, str(report)


def test_planner_shows_both_faces_and_picks_chunked_for_training():
    from seqc.passes.manager import PlanContext
    from seqc.passes.planner import choose, explain
    graph = seqc.build_graph(open(example("mamba2.seq")).read())
    node = next(n for n in graph.order() if n.op == "ssd")
    ctx = PlanContext(batch=2, length=4096, training=True)
    opts, best, _ = choose(node, ctx)
    assert {o.plan for o in opts} == {"conv", "scan", "recurrent"} and best.plan == "scan"
    assert not next(o for o in opts if o.plan == "conv").legal
    assert choose(node, PlanContext(batch=2, length=1, training=False))[1].plan == "recurrent"
    assert choose(node, PlanContext(batch=2, length=64, training=False))[1].plan == "scan"
    text = explain(graph, ctx)
    assert "ssd" in text and "recurrent" in text and "<- chosen" in text


@pytest.mark.parametrize("src, message", [
    ("model M(d = 8) {\n  input x: [B, L, d]\n  input dt: [B, L, 3]\n  input b: [B, L, 4]\n"
     "  y = ssd(x, dt = dt, B = b, C = b, head_dim = 2, d_state = 4)\n  return y\n}", "heads * head_dim"),
    ("model M(d = 8) {\n  input x: [B, L, d]\n  input dt: [B, L, 4]\n  input b: [B, L, 12]\n"
     "  y = ssd(x, dt = dt, B = b, C = b, head_dim = 2, d_state = 4, n_groups = 3)\n  return y\n}", "n_groups"),
    ("model M(d = 8) {\n  input x: [B, L, d]\n  input dt: [B, L, 4]\n  input b: [B, L, 5]\n"
     "  y = ssd(x, dt = dt, B = b, C = b, head_dim = 2, d_state = 4)\n  return y\n}", "n_groups * d_state"),
])
def test_shape_errors_are_located(src, message):
    with pytest.raises(seqc.SeqcError) as err:
        seqc.build_graph(src)
    assert message in str(err.value) and ":5:" in str(err.value)


@pytest.mark.parametrize("override, name", [
    (dict(use_bias=True), "use_bias"), (dict(hidden_act="gelu"), "hidden_act"),
    (dict(time_step_limit=(0.0, 10.0)), "time_step_limit"), (dict(num_heads=3), "num_heads * head_dim"),
])
def test_interop_refuses_what_it_cannot_express(override, name):
    config = {**_config(1).to_dict(), **override}
    with pytest.raises(seqc.SeqcError, match="Mamba2") as err:
        family.spec_for_config(config)
    assert name in str(err.value)


def test_tied_head_reuses_the_embedding(tmp_path):
    cfg = _config(1, tie_word_embeddings=True)
    ref = _reference(cfg)
    ours = _ours(ref, cfg, tmp_path)
    tokens = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_agree(ref(tokens).logits, ours(tokens), HF_TOL, "logits")


@pytest.mark.parametrize("L, chunk, G, with_h0", [(11, 4, 2, False), (8, 8, 1, True), (3, 8, 4, False)])
def test_chunked_function_gradcheck(L, chunk, G, with_h0):
    """The hand-written backward of the chunked SSD against finite differences (torch.autograd.gradcheck,
    float64), with and without an initial state, padded and whole chunks."""
    from seqc.backends.torch.ops.ssd import ssd_chunked
    g = torch.Generator().manual_seed(L)
    b, H, P, N = 2, 4, 2, 3
    x = torch.randn(b, L, H, P, dtype=torch.float64, generator=g)
    dt = torch.rand(b, L, H, dtype=torch.float64, generator=g)
    a = -torch.rand(H, dtype=torch.float64, generator=g) - 0.1
    B, C = (torch.randn(b, L, G, N, dtype=torch.float64, generator=g) for _ in range(2))
    D = torch.randn(H, dtype=torch.float64, generator=g)
    ins = [x, dt, a, B, C, D] + ([torch.randn(b, H, P, N, dtype=torch.float64, generator=g)] if with_h0 else [])
    ins = [t.requires_grad_() for t in ins]

    def f(*t):
        return ssd_chunked(*t[:5], t[6] if with_h0 else None, chunk, D=t[5])
    assert torch.autograd.gradcheck(f, ins)


@pytest.mark.parametrize("bias, kernel, with_state", [(True, 4, False), (False, 3, True), (True, 1, True)])
def test_conv1d_layer_matches_torch_depthwise_conv(bias, kernel, with_state):
    """The time-major shifted multiply-add conv1d (values, input / weight / bias / window gradients)
    against torch's F.conv1d with groups = channels on the window-padded input."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(kernel)
    b, L, d = 2, 7, 5
    layer = LAYERS["conv1d"]([d], dict(kernel=kernel, bias=bias, activation="silu")).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64, generator=g))
    x = torch.randn(b, L, d, dtype=torch.float64, generator=g, requires_grad=True)
    window = torch.randn(b, d, kernel - 1, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(b, L, d, dtype=torch.float64, generator=g)
    y, st = layer(x, state={"window": window} if with_state else None, return_state=True)
    ins = [x] + ([window] if with_state else []) + list(layer.parameters())
    grads = torch.autograd.grad((y * w).sum(), ins)
    start = window if with_state else torch.zeros_like(window)
    padded = torch.cat([start, x.transpose(1, 2)], -1)
    ref = F.silu(F.conv1d(padded, layer.weight, layer.bias if bias else None, groups=d)).transpose(1, 2)
    ref_grads = torch.autograd.grad((ref * w).sum(), ins)
    assert_agree(ref, y, 1e-13, "output")
    assert_agree(padded[..., L:], st["window"], 0, "window")
    for r, c in zip(ref_grads, grads):
        assert_agree(r, c, 1e-13, "gradient")


@pytest.mark.parametrize("with_h0, with_D, L, H, G", [(True, True, 11, 4, 2), (False, False, 11, 4, 2),
                                                     (False, True, 8, 4, 1), (True, True, 7, 1, 1)])
def test_chunked_core_as_a_custom_op_passes_opcheck(with_h0, with_D, L, H, G):
    """The custom op torch.compile traces (schema, fake shapes and strides, autograd
    registration, absent optional inputs) checked by torch.library.opcheck; its values and
    gradients equal to the eager core's.  One group with whole chunks (B, C regrouped by a
    mere view of the input) and one head (two intermediates sharing storage): the op's
    outputs must still be tensors of their own."""
    from seqc.backends.torch.ops import ssd
    g = torch.Generator().manual_seed(3)
    b, P, N = 2, 2, 3
    args = [torch.randn(b, L, H, P, dtype=torch.float64, generator=g), torch.rand(b, L, H, dtype=torch.float64, generator=g),
            -torch.rand(H, dtype=torch.float64, generator=g) - 0.1,
            torch.randn(b, L, G, N, dtype=torch.float64, generator=g), torch.randn(b, L, G, N, dtype=torch.float64, generator=g),
            torch.randn(H, dtype=torch.float64, generator=g) if with_D else None,
            torch.randn(b, H, P, N, dtype=torch.float64, generator=g) if with_h0 else None]
    args = [t if t is None else t.requires_grad_(True) for t in args]
    torch.library.opcheck(ssd._CHUNKED._op, (*args, 4))
    out = ssd._CHUNKED._op(*args, 4)[:2]
    ref = ssd.ssd_chunked(*args[:5], args[6], 4, D=args[5])
    present = [t for t in args if t is not None]
    for a, r in zip(out, ref):
        assert_agree(r, a, 0, "custom op vs eager")
    g1 = torch.autograd.grad(out[0].sum() + out[1].square().sum(), present)
    g2 = torch.autograd.grad(ref[0].sum() + ref[1].square().sum(), present)
    for a, r in zip(g1, g2):
        assert_agree(r, a, 0, "custom op gradient vs eager")
