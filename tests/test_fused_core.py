"""FusedCore (backends/torch/fused.py), the pattern behind the hand-differentiated cores: a
toy core checked in eager mode and as custom ops under torch.compile (aot_eager) against
autograd of the same formula - outputs that are views of the inputs or of each other (the op
must hand out fresh tensors), an input that gets no gradient, an absent optional input, and
a core without options."""
from __future__ import annotations

import torch

from seqc.backends.torch.fused import FusedCore


def _forward(x, w, b):
    y = x * w if b is None else x * w + b
    flat = x.view(-1)                   # a view of the input, and a view of another output below
    return (y, flat.view(x.shape)), (flat,)


def _backward(inputs, saved, grads, options):
    x, w, b = inputs
    gy, gx = grads
    return gy * w + gx, None, None if b is None else gy.sum(0)     # w gets no gradient (by contract)


def _fake(x, w, b):
    return [x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.numel())]


CORE = FusedCore("test_toy_core", "Tensor x, Tensor w, Tensor? b", _forward, _backward, _fake, n_outputs=2)


def test_eager_and_compiled_agree_with_the_formula():
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    b = b[0]
    for bias in (b, None):
        leaves = [t.clone().requires_grad_() for t in (x, w)] + ([b.clone().requires_grad_()] if bias is not None else [])
        def loss(core_call):
            y, same = core_call(leaves[0], leaves[1], leaves[2] if bias is not None else None)
            return (y * torch.arange(12, dtype=y.dtype).view(3, 4)).sum() + (same ** 2).sum()
        want_y = x * w + (b if bias is not None else 0)
        for call in (CORE, torch.compile(lambda *a: CORE(*a), backend="aot_eager", fullgraph=True)):
            got = torch.autograd.grad(loss(call), leaves, allow_unused=True, materialize_grads=True)
            gy = torch.arange(12, dtype=x.dtype).view(3, 4)
            assert torch.allclose(got[0], gy * w + 2 * x)                  # the hand-written gradient
            assert torch.equal(got[1], torch.zeros_like(w))                # none by contract: zeros
            if bias is not None:
                assert torch.allclose(got[2], gy.sum(0))
            y, same = call(x, w, bias)
            assert torch.allclose(y, want_y) and torch.equal(same, x)


def test_custom_op_outputs_never_alias_and_opcheck_passes():
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    out = CORE._op(x, w, None)
    ptrs = [t.untyped_storage().data_ptr() for t in out]
    assert len(set(ptrs)) == len(ptrs) and x.untyped_storage().data_ptr() not in ptrs
    torch.library.opcheck(CORE._op, (x.requires_grad_(), w, None))


def test_a_core_without_options_registers():
    core = FusedCore("test_toy_no_options", "Tensor x", lambda x: ((x * 2,), ()),
                     lambda inputs, saved, grads, options: (grads[0] * 2,), lambda x: [x.new_empty(x.shape)], n_outputs=1)
    x = torch.randn(5, requires_grad=True)
    (y,) = torch.compile(lambda t: core(t), backend="aot_eager", fullgraph=True)(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.full_like(x, 2.0))
