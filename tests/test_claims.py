"""Tests for properties an audit found unguarded (each names the planted bug it
catches): the pass manager's verifier, `seqc graph -p`, the LSTM initialiser's
bound, and the planner's training mode."""
from __future__ import annotations

import math

import numpy as np
import pytest

import seqc
from conftest import example
from seqc.cli import main


def test_verifier_runs_after_every_pass_and_names_the_pass():
    """Bug caught: the pass manager stops verifying after each pass."""
    from seqc.passes import manager
    from seqc.passes.manager import Pipeline, PlanContext, compiler_pass, run_pipeline
    from seqc.ir import Ref

    @compiler_pass("test-plant-dangling-input")
    def plant(g, ctx):
        """Planted bug: a node reads a value no node defines."""
        n = next(n for n in g.order() if n.op == "rmsnorm")
        n.inputs = (Ref(10_000, 0),)        # bypass set_inputs: the edges no longer match either
        return g

    try:
        g = seqc.build_graph(example("mamba.seq"), {"n_layers": 1})
        pipeline = Pipeline().add("test-plant-dangling-input", after="fold-identities")
        with pytest.raises(Exception) as info:
            run_pipeline(g, PlanContext(), pipeline)
        msg = str(info.value)
        assert "test-plant-dangling-input" in msg and "%10000" in msg
        assert "fold-identities" in msg        # and the passes that ran before it
        # placed last, it is still caught (the verifier runs after the final pass too)
        with pytest.raises(Exception, match="test-plant-dangling-input"):
            run_pipeline(g, PlanContext(), Pipeline().add("test-plant-dangling-input"))
    finally:
        manager.PASSES.pop("test-plant-dangling-input", None)


def test_graph_honours_param_overrides(capsys):
    """Bug caught: `seqc graph` ignores -p."""
    def dump(*extra):
        assert main(["graph", example("mamba.seq"), *extra]) == 0
        return capsys.readouterr().out
    default, one, three = dump(), dump("-p", "n_layers=1"), dump("-p", "n_layers=3", "-p", "d_model=32")
    assert "n_layers=1" in one.splitlines()[0] and "n_layers=3" in three.splitlines()[0]
    assert "d_model=32" in three.splitlines()[0] and "f32[B, L, 32]" in three
    # the stack's size follows the override: one residual add per layer
    assert one.count("= add(") == 1 and three.count("= add(") == 3 and default != one


@pytest.mark.parametrize("hidden", [16, 256])
def test_lstm_initialiser_bound_is_one_over_sqrt_hidden(hidden):
    """Bug caught: the LSTM initialiser's bound off by sqrt(hidden).  torch.nn.LSTM
    draws every parameter from U(-k, k) with k = 1/sqrt(hidden) (its documentation);
    for U(-k, k) the max |w| over n draws is within k(1 - 5/n) of k with
    probability 1 - e^-5, and the standard deviation is k/sqrt(3)."""
    model = seqc.compile(example("lstm.seq"), params={"hidden": hidden, "d_model": 32, "layers": 2}, seed=3)
    k = 1 / math.sqrt(hidden)
    for name, w in model.state_dict().items():
        w = w.detach().double().numpy().ravel()
        n = w.size
        assert np.abs(w).max() <= k * (1 + 1e-6), name
        assert np.abs(w).max() >= k * (1 - 5 / n), name
        # sample std of n uniform draws: relative standard error ~ sqrt(0.8/n); allow 5 standard errors
        assert abs(w.std() / (k / math.sqrt(3)) - 1) < 5 * math.sqrt(0.8 / n), name


def test_training_mode_changes_plans_toward_batched_ones():
    """Bug caught: the planner ignores the backward cost.  Autograd replays a
    per-step loop in backward far more dearly than a batched plan's fixed ops (and the
    generated recurrence kernel's backward costs 13x its forward, the convolution's 3x),
    so with training=True the planner must switch some lengths from the recurrence to
    the batched convolution -- and never the other way."""
    from seqc.compiler import plan_graph

    def plans(length, training):
        g = plan_graph(example("s4d.seq"), "torch", None, length=length, batch=1, training=training)
        return [n.meta["plan"] for n in g.order() if n.op == "ssm"]

    changed = []
    for length in (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512):
        inference, training = plans(length, False), plans(length, True)
        if inference != training:
            changed.append((length, inference, training))
    assert changed, "training=True never changes a plan"
    assert all(i != ["conv"] and t == ["conv"] for _, i, t in changed), changed
    # once training prefers the convolution it keeps preferring it at longer lengths
    first = changed[0][0]
    assert all(plans(L, True) == ["conv"] for L in (first, 2 * first, 8 * first))
