"""Layer reprs read like torch.nn's: the input size, the required and shape-defining
attributes, and every other attribute only where the spec changed its default.
Initialisation-only attributes (``init``, ``dt_min``, ...) never appear: the compiled
layer does not carry them.  The expected strings are written by hand from the specs."""
import torch.nn.functional as F

import seqc
from conftest import example

SPEC = """
model M(d = 8) {
  input x: [B, L, d]
  dt = linear(x, 4, bias = false, init = mamba_dt, dt_min = 0.01, dt_max = 0.05)
  ln = layernorm(dt, eps = 1e-6)
  rec = lstm(ln, hidden = 6, layers = 2)
  ssm = ssm(rec, d_state = 8, init = s4d_real, disc = bilinear)
  return ssm
}
"""


def test_mamba_block_reprs():
    # mamba.seq, d_model 32: d_inner = 2 * 32, dt_rank = ceil(32 / 16) = 2, x_proj out 2 + 2 * 16
    model = seqc.compile(example("mamba.seq"), params={"d_model": 32, "n_layers": 1})
    mixer = model.get_submodule("layers.0.mixer")
    assert repr(mixer.in_proj) == "Linear(in_features=32, out=128, bias=False)"
    assert repr(mixer.x_proj) == "Linear(in_features=64, out=34, bias=False)"
    assert repr(mixer.dt_proj) == "Linear(in_features=2, out=64, bias=True)"      # init = mamba_dt: not shown
    assert repr(mixer.out_proj) == "Linear(in_features=64, out=32, bias=False)"
    assert repr(mixer.conv1d) == "Conv1d(in_features=64, kernel=4, bias=True, activation='silu')"
    assert repr(model.get_submodule("layers.0.norm")) == "RMSNorm(in_features=32)"
    assert mixer.extra_repr().startswith("d_state=16, delta_bias=False")
    text = repr(model)
    for hidden in ("dt_min", "dt_max", "dt_init_floor", "init=", "tie=", "direction=", "eps="):
        assert hidden not in text, hidden


def test_changed_defaults_show_and_init_options_do_not():
    model = seqc.compile(SPEC)
    assert repr(model.dt) == "Linear(in_features=8, out=4, bias=False)"
    assert repr(model.ln) == "LayerNorm(in_features=4, eps=1e-06, bias=True)"
    assert repr(model.rec) == "LSTM(in_features=4, hidden=6, layers=2, bias=True, plan='recurrent')"
    assert repr(model.ssm) == "SSM(in_features=6, d_state=8, disc='bilinear', plan='scan')"
    for layer in (model.dt, model.ssm):
        assert not {"init", "dt_min", "dt_max", "dt_init_floor"} & set(layer.attrs)


def test_init_options_still_draw_the_weights():
    """The layer no longer carries dt_min / dt_max, but the initialiser still used them:
    Mamba's dt_proj bias is softplus^-1 of a dt drawn log-uniformly in [dt_min, dt_max]."""
    layer = seqc.compile(SPEC.replace("bias = false", "bias = true")).dt
    assert repr(layer) == "Linear(in_features=8, out=4, bias=True)"
    dt = F.softplus(layer.bias.detach().double())     # float32 bias: ~1e-7 relative error, 1e-6 allowed
    assert bool(((dt >= 0.01 * (1 - 1e-6)) & (dt <= 0.05 * (1 + 1e-6))).all()), dt
