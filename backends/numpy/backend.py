"""The NumPy backend: the float64 reference (each op's oracle), on the CPU."""
from __future__ import annotations

from seqc.backend import Backend, register_backend
from seqc.inputs import as_list

from .codegen import NumpyModel, emit


class NumpyBackend(Backend):
    name = "numpy"
    autograd = False
    default_dtype = "float64"
    devices = ("cpu",)

    def machine(self, device: str, dtype: str) -> dict:
        # fitted with benchmarks/bench_plans.py on the 2-core development machine (AMD EPYC, 32 MiB L3);
        # the oracle always computes in float64, whatever dtype the plan is asked for
        self.check_target(device, dtype)
        return dict(step=25e-6, llc=32 * 2 ** 20, ns={"conv": 0.6, "scan": 24.0, "recurrent": 2.0,
                                                       "recurrent_dram": 12.0, "selective": 20.0})

    def supports(self, call) -> bool:
        from .codegen import Oracles
        return callable(getattr(Oracles(), call.op, None))

    def emit(self, program) -> str:
        return emit(program)

    def build(self, program, weights=None, *, seed=0, device="cpu", dtype=None):
        self.check_target(device, dtype or self.default_dtype)
        return NumpyModel(program, seed=seed, weights=weights)

    def forward(self, model, inputs):
        import numpy as np
        return [np.asarray(y, dtype=np.float64) for y in as_list(model(*inputs, model.weights))]

    def trace(self, model, inputs, hook=None):
        import numpy as np
        out, values = model.trace(*inputs, hook=hook)
        return [np.asarray(o) for o in as_list(out)], {k: list(v) if isinstance(v, tuple) else [v]
                                                          for k, v in values.items()}


register_backend(NumpyBackend())
