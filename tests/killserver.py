"""Start every kill scenario of tests/test_crash_resume.py as a forked child of one process that imported kdcache.

Run as `python tests/killserver.py SPEC.json` with tests/ on PYTHONPATH. SPEC.json is a list of
{"point", "marker", "args"[, "uid"]}. Each child sets KILLHOOK_POINT/KILLHOOK_MARKER, then runs exactly
`import killhook; from kdcache.cli import kdcache_main; kdcache_main()` with the dump's arguments (one with a
"uid" switches to that user instead and imports no hook); its stdout and stderr go to <marker>.log. The fork
only saves each child the seconds of importing torch/torchvision again.

This process writes {point: pid} to SPEC.json.pids once every child is started, reaps the children, and
records how each one ended in <marker>.exit ("signal 9", "exit 1", ...).
"""

from __future__ import annotations

import json
import os
import sys

import h5py  # noqa: F401  imported before forking: everything a dump needs, no threads started yet
import zarr  # noqa: F401

import kdcache.io.output  # noqa: F401
import kdcache.ops.dump  # noqa: F401
from kdcache.cli import kdcache_main  # noqa: F401
from kdcache.data.datasets import open_dataset


def child(sc: dict) -> None:
    os.environ["KILLHOOK_POINT"], os.environ["KILLHOOK_MARKER"] = sc["point"], sc["marker"]
    log = os.open(sc["marker"] + ".log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.argv = ["kdcache", *sc["args"]]
    code = 98
    try:
        if sc.get("uid") is not None:  # an unprivileged user, for whom file modes are enforced
            os.setgid(sc["uid"])
            os.setuid(sc["uid"])
        else:
            import killhook  # noqa: F401  patches kdcache for KILLHOOK_POINT
        from kdcache.cli import kdcache_main
        kdcache_main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # as the interpreter would: traceback on stderr, exit status 1
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    open_dataset("digits", "train")  # loads (and caches) the embedded digits arrays before forking
    spec = sys.argv[1]
    with open(spec) as f:
        specs = json.load(f)
    pids = {}
    for sc in specs:
        pid = os.fork()
        if pid == 0:
            child(sc)
        pids[pid] = sc
    with open(spec + ".pids.tmp", "w") as f:
        json.dump({sc["point"]: pid for pid, sc in pids.items()}, f)
    os.replace(spec + ".pids.tmp", spec + ".pids")
    while pids:
        pid, status = os.wait()
        sc = pids.pop(pid, None)
        if sc is None:
            continue
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
        with open(sc["marker"] + ".exit", "w") as f:
            f.write(how)


if __name__ == "__main__":
    main()
