"""The NumPy backend: the float64 reference every other backend is checked against.

``ops`` holds the reference semantics of every op in ``seqc.registry.OPS``
(plain, sequential, obviously-correct NumPy); the code generator that turns a
lowered program into calls of those functions lives beside it.
"""
