"""PyTorch backend: runtime kernels and code generation for torch modules."""
