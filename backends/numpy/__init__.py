"""The NumPy backend: the float64 reference every other backend is checked against.

``ops`` is a view of the reference semantics of every op in ``seqc.ops.OPS``
(plain, sequential, obviously-correct NumPy, defined beside each op's spec);
the code generator that turns a lowered program into calls of those functions
lives beside it.
"""
