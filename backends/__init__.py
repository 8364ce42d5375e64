"""Code generators and runtimes, one sub-package per backend (numpy, torch, triton).

Installed as ``seqc.backends``.  Every backend renders the same lowered program
(``seqc.lower``); they differ only in the runtime functions they call.
"""
