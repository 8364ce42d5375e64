"""The PyTorch backend: an ``nn.Module`` generated from the lowered program
(``module.py``, ``codegen.py``), on the CPU or a CUDA device, in any float dtype."""
from __future__ import annotations

from seqc.backend import Backend, register_backend
from seqc.errors import SeqcError
from seqc.inputs import as_list

# Machine models.  CPU figures fitted with benchmarks/bench_plans.py on the 2-core development machine
# (AMD EPYC, 32 MiB L3); the CUDA figures are estimates.
_MACHINES = {
    "cpu": dict(step=10e-6, llc=32 * 2 ** 20, ns={"conv": 0.6, "scan": 24.0, "recurrent": 1.0,
                                                   "recurrent_dram": 12.0, "selective": 0.25}),
    "cuda": dict(step=8e-6, llc=50 * 2 ** 20, ns={"conv": 0.01, "scan": 0.02, "recurrent": 0.01,
                                                   "recurrent_dram": 0.02, "selective": 0.005}),
}

# With the generated numba kernels (the default install): the LTI ssm's recurrence is one kernel.
# Fitted with `python -m benchmarks.bench_plans --cpu-time [--train]` (1 thread; S4D H=64, N=64, B=1 and 8,
# L=16..16384): ns per state element forward (lti_kernel) and forward+backward (lti_kernel_train);
# the FFT convolution's ns per Vandermonde element (lti_conv) and per FFT butterfly (lti_fft), and its
# forward+backward / forward factors.
_CPU_KERNELS_NS = {"lti_kernel": 0.65, "lti_kernel_train": 8.5, "lti_conv": 0.835, "lti_fft": 0.97,
                   "lti_conv_train": 2.8, "lti_conv_train_steps": 4.0}


def _cpu_kernels_available() -> bool:
    """Whether the LTI recurrence will run as the numba kernel (without importing numba)."""
    import importlib.util

    from . import cpu_kernels
    return cpu_kernels.wanted() and importlib.util.find_spec("numba") is not None


class TorchBackend(Backend):
    name = "torch"
    autograd = True
    default_dtype = "float32"
    devices = ("cpu", "cuda")

    def machine(self, device: str, dtype: str) -> dict:
        self.check_target(device, dtype)
        m = dict(_MACHINES[device])
        if device == "cpu" and _cpu_kernels_available():
            m["ns"] = {**m["ns"], **_CPU_KERNELS_NS}
        return m

    def supports(self, call) -> bool:
        from .functional import FUNCTIONS
        from .layers import LAYERS
        return call.op in (LAYERS if call.is_layer else FUNCTIONS)

    def emit(self, program) -> str:
        """A file that runs on its own: imports, the generated class, ``build(program)``."""
        from .codegen import standalone
        return standalone(program)

    def build(self, program, weights=None, *, seed=0, device="cpu", dtype=None):
        import torch

        from seqc.init import init_weights

        from .module import build_module
        dtype = dtype or self.default_dtype
        self.check_target(device, dtype)
        if device == "cuda" and not torch.cuda.is_available():
            raise SeqcError("device='cuda' asked for, but torch sees no CUDA device here")
        if weights is None:
            weights = init_weights(program.graph, seed=seed)
        model = build_module(program)
        if device != "cpu":
            model = model.to(device)
        if dtype != "float32":
            model = model.to(getattr(torch, dtype))
        return model.load_numpy(weights)       # after the cast: float64 weights stay exact

    def inference(self):
        import torch
        return torch.no_grad()

    def backward(self, model, outputs):
        model.zero_grad(set_to_none=True)
        sum(y.float().sum() for y in as_list(outputs)).backward()

    def inputs(self, model, inputs):
        return self.tensors(model, inputs)

    def tensors(self, model, inputs):
        """NumPy inputs as tensors on the model's device, floats in its dtype."""
        import torch
        opts = model.state_options()
        return [torch.as_tensor(x, device=opts["device"]) if x.dtype.kind in "iub"
                else torch.as_tensor(x, dtype=opts["dtype"], device=opts["device"]) for x in inputs]

    def forward(self, model, inputs):
        import torch
        with torch.no_grad():
            return [y.detach().to("cpu", torch.float64).numpy() for y in as_list(model(*self.tensors(model, inputs)))]

    def trace(self, model, inputs, hook=None):
        out, values = model.trace(*inputs, hook=hook)
        return as_list(out), {k: list(v) if isinstance(v, tuple) else [v] for k, v in values.items()}


register_backend(TorchBackend())
