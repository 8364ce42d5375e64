"""lark's analysis of the grammar cached in seqc's cache directory: written on the first
parse, reused, rebuilt silently when damaged, skipped when the directory cannot be made.
Each case is a fresh interpreter (a process keeps the parser it built)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARSE = ("import seqc; m = seqc.parse(open('examples/mamba.seq').read()); "
         "from seqc import parser; print(type(parser._parser()).__name__, parser._grammar_cache())")


def parse_in_fresh_process(cache_dir):
    env = dict(os.environ, SEQC_CACHE_DIR=str(cache_dir), PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", PARSE], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0 and out.stderr == "", out.stderr[-3000:]
    return out.stdout.split()


def test_written_reused_and_rebuilt_when_damaged(tmp_path):
    cache = tmp_path / "parser" / "seq.lark.cache"
    assert parse_in_fresh_process(tmp_path) == ["Lark", str(cache)]
    first = cache.read_bytes()
    assert len(first) > 1000
    mtime = cache.stat().st_mtime_ns
    parse_in_fresh_process(tmp_path)
    assert cache.stat().st_mtime_ns == mtime          # loaded, not rewritten
    cache.write_bytes(first[:len(first) // 3])        # a write cut short
    parse_in_fresh_process(tmp_path)
    assert len(cache.read_bytes()) > len(first) // 3  # rebuilt and written again
    cache.write_bytes(b"not a cache")
    parse_in_fresh_process(tmp_path)
    assert len(cache.read_bytes()) > 1000


def test_no_cache_where_the_directory_cannot_be_made(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert parse_in_fresh_process(blocker / "seqc") == ["Lark", "False"]
