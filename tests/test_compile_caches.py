"""What a repeated compile reuses, and what it must not: parsed ASTs (keyed by file name
and a hash of the text, so an edited file is parsed again), code objects of generated
source, and the cycle collector paused during a compile and restored after it."""
import gc
import threading

import seqc
from seqc import codegen, parser

SPEC = "model M(d = {d}) {{\n  input x: [B, L, d]\n  y = linear(x, {out})\n  return y\n}}\n"


def test_same_text_reuses_the_ast_and_an_edit_is_parsed_again():
    a = parser.parse(SPEC.format(d=4, out=3), "m.seq")
    assert parser.parse(SPEC.format(d=4, out=3), "m.seq") is a
    edited = parser.parse(SPEC.format(d=4, out=5), "m.seq")          # same name, new text
    assert edited is not a and "5" in repr(edited) and "5" not in repr(a)
    other_name = parser.parse(SPEC.format(d=4, out=3), "other.seq")  # spans carry the file name
    assert other_name is not a


def test_recompiling_reuses_code_and_a_different_model_gets_its_own():
    m1 = seqc.compile(SPEC.format(d=4, out=3))
    m2 = seqc.compile(SPEC.format(d=4, out=3))
    m3 = seqc.compile(SPEC.format(d=4, out=7).replace("return y", "z = linear(y, 7)\n  return z"))
    assert type(m1) is not type(m2)                                   # a class per compile ...
    assert type(m1).forward.__code__ is type(m2).forward.__code__     # ... from one code object
    assert type(m3).forward.__code__ is not type(m1).forward.__code__   # other source, other code
    x = __import__("torch").randn(2, 5, 4)
    assert m3(x).shape == (2, 5, 7) and m1(x).shape == (2, 5, 3)
    assert len(codegen._CODE) <= codegen._CODE.keep


def test_collector_is_paused_during_a_compile_and_restored():
    seen = []
    real = seqc.compiler.lower

    def spy(graph):
        seen.append(gc.isenabled())
        return real(graph)

    seqc.compiler.lower = spy
    try:
        assert gc.isenabled()
        seqc.compile(SPEC.format(d=4, out=3))
        assert seen == [False] and gc.isenabled()
        gc.disable()                                   # a caller that turned it off keeps it off
        seqc.compile(SPEC.format(d=4, out=3))
        assert not gc.isenabled()
    finally:
        gc.enable()
        seqc.compiler.lower = real


def test_concurrent_compiles_restore_the_collector():
    errors = []

    def work():
        try:
            for _ in range(3):
                seqc.compile(SPEC.format(d=4, out=3))
        except BaseException as e:       # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and gc.isenabled()
