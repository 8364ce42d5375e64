"""Run many seqc cases, each in its own forked process, cheaply.

The parent imports seqc (and torch) once, runs an optional prelude, then forks
one child per case: the child applies the case's environment, memory limit
(RLIMIT_AS, counted above what the parent already maps) and standard input,
runs ``seqc.cli.main(argv)`` or a Python snippet, and exits with its status.
The parent kills a child that outlives its timeout.  Cases come as JSON on
stdin; results (status or null for a timeout, stdout, stderr) go as JSON to
stdout.  An uncaught exception in a child prints a traceback and exits 1,
as Python would.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _child(case, namespace, out_path, err_path, in_path) -> None:
    os.environ.update(case.get("env") or {})
    for k in case.get("unset") or ():
        os.environ.pop(k, None)
    if case.get("memory"):
        limit = _vm_bytes() + int(case["memory"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    fd = os.open(in_path, os.O_RDONLY)
    os.dup2(fd, 0)
    for path, target in ((out_path, 1), (err_path, 2)):
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(fd, target)
    if case.get("cwd"):
        os.chdir(case["cwd"])
    code = 1
    try:
        if case["kind"] == "cli":
            from seqc.cli import main
            code = main(case["argv"])
        else:
            exec(compile(case["code"], f"<case {case['name']}>", "exec"), dict(namespace))
            code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - what an uncaught exception does in a real process
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def main() -> None:
    request = json.load(sys.stdin)
    namespace: dict = {}
    import seqc  # noqa: F401
    import seqc.cli  # noqa: F401
    import seqc.commands  # noqa: F401
    if request.get("prelude"):
        exec(compile(request["prelude"], "<prelude>", "exec"), namespace)
    results = {}
    work = tempfile.mkdtemp(prefix="seqc-forkrun-")
    for case in request["cases"]:
        out_path, err_path, in_path = (os.path.join(work, n) for n in ("out", "err", "in"))
        for p in (out_path, err_path):
            open(p, "wb").close()
        with open(in_path, "wb") as f:
            f.write((case.get("stdin") or "").encode("latin-1"))
        sys.stdout.flush()
        sys.stderr.flush()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(case, namespace, out_path, err_path, in_path)
        status = None
        deadline = start + float(case.get("timeout", 30))
        while True:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(st)
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.005)
        with open(out_path, "rb") as f:
            out = f.read().decode("utf-8", "replace")
        with open(err_path, "rb") as f:
            err = f.read().decode("utf-8", "replace")
        results[case["name"]] = {"rc": status, "stdout": out, "stderr": err,
                                 "seconds": round(time.monotonic() - start, 3)}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
