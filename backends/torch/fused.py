"""Layer cores with a hand-written backward (``FusedCore``): one forward and one backward
function, run as an ``autograd.Function`` in eager mode and as a pair of ``torch.library``
custom ops while torch.compile traces.

As custom ops with fake implementations (output shapes from the inputs' symbolic shapes),
dynamo puts one opaque call in the graph: no graph break, no Python loop unrolled into the
trace, and a new batch or length reuses the compiled graph.  Eager mode calls the functions
directly (calling a custom op imports ``torch._dynamo``: seconds of a cold start that never
compiles).

The contract for a core ``name``:

* ``forward(*args) -> (outputs, saved)``: ``args`` are the tensors (``None`` for an absent
  optional one) then the options (int, bool, str), as ``params`` declares them in torch's
  schema syntax (``"Tensor x, Tensor? h0, int chunk"``); ``outputs`` are differentiable,
  ``saved`` are intermediates for the backward.  They may be views of the inputs or of
  each other: the custom op copies what it must (an op's outputs may not alias).
* ``backward(inputs, saved, grads, options) -> grads of the input tensors`` (``None`` where
  an input is absent or gets none); ``grads`` has a tensor for every output (zeros for an
  unused one).
* ``fake(*args) -> list of empty tensors`` shaped like ``outputs + saved``, contiguous.
"""
from __future__ import annotations

import torch


def _fresh(tensors, args) -> list:
    """The op's outputs, each contiguous (inductor checks them against the fake strides) and
    in storage of its own: ``contiguous()`` of an already contiguous view returns the view,
    and a custom op's output may alias neither an input nor another output.  An empty tensor
    is always copied (free, and surely no view of anything)."""
    taken = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor) and a.numel()}
    out = []
    for t in tensors:
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is None or ptr in taken:
            t = t.clone()                   # a copy of a contiguous tensor is contiguous
        else:
            taken.add(ptr)
        out.append(t)
    return out


class FusedCore:
    """One hand-differentiated core: ``core(*args)`` returns its outputs (a tuple)."""

    def __init__(self, name: str, params: str, forward, backward, fake, n_outputs: int):
        self.name, self.n_outputs = name, n_outputs
        declared = [p.strip() for p in params.split(",")]
        self.n_tensors = sum(1 for p in declared if p.startswith("Tensor"))
        options = "".join(", " + p for p in declared[self.n_tensors:])
        self._forward, self._backward = forward, backward
        core = self

        class Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                outputs, saved = core._forward(*args)
                core._setup(ctx, args, tuple(outputs), tuple(saved))
                return tuple(outputs)

            @staticmethod
            @torch.autograd.function.once_differentiable
            def backward(ctx, *grads):
                return core._grad(ctx, grads, core._backward)

        Eager.__name__ = Eager.__qualname__ = f"Fused_{name}"
        self._eager = Eager

        def op_forward(*args):
            outputs, saved = forward(*args)
            return _fresh((*outputs, *saved), args)

        def op_backward(inputs, saved, grads, *options):
            got = backward(inputs, saved, grads, options)
            like = next(t for t in inputs if t is not None)
            got = [like.new_empty(0) if t is None else torch.zeros_like(t) if g is None else g   # absent / none
                   for g, t in zip(got, inputs)]
            return _fresh(got, (*inputs, *saved, *grads))

        def fake_backward(inputs, saved, grads, *options):
            like = next(t for t in inputs if t is not None)
            return [like.new_empty(0) if t is None else t.new_empty(t.shape) for t in inputs]

        self._op = torch.library.custom_op(f"seqc::{name}", op_forward, mutates_args=(),
                                           schema=f"({params}) -> Tensor[]")
        self._op.register_fake(fake)
        self._op_backward = torch.library.custom_op(
            f"seqc::{name}_backward", op_backward, mutates_args=(),
            schema=f"(Tensor?[] inputs, Tensor[] saved, Tensor[] grads{options}) -> Tensor[]")
        self._op_backward.register_fake(fake_backward)

        def setup(ctx, inputs, output):
            saved = output[n_outputs:]        # outputs of the op, but not differentiable ones
            ctx.mark_non_differentiable(*saved)
            self._setup(ctx, inputs, output[:n_outputs], saved)

        def grad(ctx, grads):          # one list: the gradients of the op's Tensor[] output
            def call(inputs, saved, grads, options):
                got = self._op_backward(list(inputs), list(saved), list(grads), *options)
                return [None if t is None else g for g, t in zip(got, inputs)]
            return self._grad(ctx, grads[:self.n_outputs], call)

        self._op.register_autograd(grad, setup_context=setup)

    def _setup(self, ctx, args, outputs, saved):
        tensors, options = args[:self.n_tensors], args[self.n_tensors:]
        ctx.save_for_backward(*tensors, *saved)
        ctx.options = tuple(options)
        ctx.like = [(o.shape, o.dtype, o.device) for o in outputs]

    def _grad(self, ctx, grads, backward):
        stored = ctx.saved_tensors
        inputs, saved = stored[:self.n_tensors], stored[self.n_tensors:]
        grads = [torch.zeros(shape, dtype=dtype, device=device) if g is None else g.contiguous()
                 for g, (shape, dtype, device) in zip(grads, ctx.like)]
        got = backward(inputs, saved, grads, ctx.options)
        return tuple(got) + (None,) * len(ctx.options)

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return tuple(self._op(*args)[:self.n_outputs])
        return self._eager.apply(*args)
