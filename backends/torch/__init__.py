"""PyTorch backend: runtime kernels and code generation for torch modules.

Importing it imports every op implementation (``ops/``, plus the scan layers in
``layers.py`` / ``lti.py``), so ``base.LAYERS`` and ``base.FUNCTIONS`` are complete."""
from . import ops  # noqa: F401
from . import layers  # noqa: F401
