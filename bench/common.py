"""Shared helpers for the benchmark scripts: machine/version info, timing, contention, tables, JSON results,
sizes on disk, and peak-RSS measurement of subprocesses (synthetic caches: bench/synthcache.py).

Benchmarks are scripts, not tests: each prints its table and writes bench/results/<name>.json.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
THREADS = int(os.environ.get("KDBENCH_THREADS", "2"))  # torch threads of the measuring process (smoke runs: 1)
if str(REPO) not in sys.path:  # so `bench.*` imports work when a script is run by path
    sys.path.insert(0, str(REPO))


def workdir(name: str) -> Path:
    """Scratch space for synthetic caches and runs (reused between runs): $KDBENCH_DIR or /tmp/kdcache-bench."""
    root = Path(os.environ.get("KDBENCH_DIR", "/tmp/kdcache-bench"))
    p = root / name
    p.mkdir(parents=True, exist_ok=True)
    return p


def setup_torch(threads: int = THREADS) -> None:
    """Fix torch's thread count (the results record it); subprocesses get it through OMP_NUM_THREADS."""
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


# --------------------------------------------------------------------------- machine / versions
def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    import h5py
    import numcodecs
    import torch
    import zarr

    import kdcache

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu_model": _lscpu_model(), "cores": os.cpu_count(), "mem_gib": round(mem / 2**30, 1),
        "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__, "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
        "numpy": np.__version__, "kdcache": kdcache.__version__,
    }


def machine_line(info: dict) -> str:
    return (f"{info['cpu_model']}, {info['cores']} cores, {info['mem_gib']} GiB; python {info['python']}, "
            f"torch {info['torch']} ({info['torch_threads']} threads), zarr {info['zarr']}, h5py {info['h5py']} "
            f"(HDF5 {info['hdf5']}), numpy {info['numpy']}, numcodecs {info['numcodecs']}")


# --------------------------------------------------------------------------- timing
class Timer:
    """`with Timer() as t: ...` then t.s (seconds, perf_counter)."""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self.t0


class DumpPhases:
    """`with DumpPhases(opened=f, finalizing=g) as ph: run_dump(cfg)` then ph.loop_s, ph.finalize_s.

    Marks the phases of a dump through the public output lifecycle it drives (kdcache.io.output.Output):
    `opened` when Output.open returns (the staging store is ready: the inference loop starts next),
    `finalizing` when Output.finalize is called (loop and writer flush done), `finalized` when it returns.
    Output.open/finalize are wrapped for the life of the block (no kdcache file changes); the optional
    callbacks run at those marks (e.g. to read RSS).
    """

    def __init__(self, **hooks: object) -> None:
        self.hooks, self.marks = hooks, {}

    def _mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()
        if callable(hook := self.hooks.get(name)):
            hook()

    def __enter__(self) -> DumpPhases:
        from kdcache.io.output import Output

        self._orig = (Output.open, Output.finalize)
        orig_open, orig_finalize = self._orig

        def open_(output, *a, **kw):
            store = orig_open(output, *a, **kw)
            self._mark("opened")
            return store

        def finalize(output, *a, **kw):
            self._mark("finalizing")
            try:
                return orig_finalize(output, *a, **kw)
            finally:
                self._mark("finalized")

        Output.open, Output.finalize = open_, finalize
        return self

    def __exit__(self, *exc: object) -> None:
        from kdcache.io.output import Output

        Output.open, Output.finalize = self._orig

    @property
    def loop_s(self) -> float:
        """The dump's inference loop with its writer thread, flushed: from the store's opening to finalize."""
        return self.marks["finalizing"] - self.marks["opened"]

    @property
    def finalize_s(self) -> float:
        return self.marks["finalized"] - self.marks["finalizing"]


def loadavg() -> float:
    """1-minute load average: other jobs share this machine's 2 cores, so every result records it."""
    return round(os.getloadavg()[0], 2)


def _cpu_busy_s() -> tuple[float, float]:
    """Machine-wide (busy, steal) CPU seconds since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / hz, steal / hz


class Contention:
    """`with Contention() as c: ...` then c.other: the share of the machine's CPU used by *other* processes
    during the block (0 = we had it alone, 1 = every core busy with someone else), i.e. machine-wide busy
    CPU time minus this process's and its waited-for children's, over elapsed x cores. Other engineers'
    jobs share this machine, so every timing records it."""

    def __enter__(self) -> Contention:
        self.t0, (self.busy0, self.steal0), self.own0 = time.perf_counter(), _cpu_busy_s(), sum(os.times()[:4])
        return self

    def __exit__(self, *exc: object) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        busy, steal = _cpu_busy_s()
        own = sum(os.times()[:4]) - self.own0
        ncpu = os.cpu_count() or 1
        self.other = round(max(0.0, busy - self.busy0 - own) / (dt * ncpu), 3)
        self.steal = round((steal - self.steal0) / (dt * ncpu), 3)


QUIET = 0.10  # a measurement counts as clean when other processes used at most 10% of the machine


def quiet_gate(max_other: float = QUIET, window_s: float = 1.0, timeout_s: float = 90.0) -> float:
    """Wait until other processes use at most `max_other` of the machine over a `window_s` window (at
    most `timeout_s`, capped by $KDBENCH_GATE_S: 0 for smoke runs); returns the last share seen. Timings are
    taken in such quiet windows when they come."""
    timeout_s = min(timeout_s, float(os.environ.get("KDBENCH_GATE_S", timeout_s)))
    t0 = time.perf_counter()
    while True:
        with Contention() as c:
            time.sleep(window_s)
        if c.other <= max_other or time.perf_counter() - t0 > timeout_s:
            return c.other


def quiet_indices(others: Sequence[float], min_keep: int = 2, max_other: float = QUIET) -> tuple[list[int], bool]:
    """The measurements (indices) taken while other processes used <= max_other of the machine, if there are
    at least `min_keep`; else all of them and False (the result is then flagged as contended)."""
    ok = [i for i, o in enumerate(others) if o <= max_other]
    return (ok, True) if len(ok) >= min_keep else (list(range(len(others))), False)


def median(xs: Sequence[float]) -> float:
    return float(np.median(np.asarray(xs, dtype=np.float64)))


# --------------------------------------------------------------------------- tables and results
def _fmt(v: object) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "" if v is None else str(v)


def table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of `rows` (dicts) over `columns` (default: keys of the first row)."""
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths)) + " |"
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def command_line() -> str:
    rel = os.path.relpath(sys.argv[0], REPO) if sys.argv and sys.argv[0] else "?"
    return " ".join([".venv/bin/python", shlex.quote(rel), *map(shlex.quote, sys.argv[1:])])


def write_results(name: str, payload: dict) -> Path:
    """Write bench/results/<name>.json (or $KDBENCH_RESULTS/<name>.json) with the machine, the command and
    the time, and return the path."""
    results = Path(os.environ.get("KDBENCH_RESULTS", RESULTS))  # e.g. a scratch folder for smoke runs
    results.mkdir(parents=True, exist_ok=True)
    out = {
        "benchmark": name, "command": command_line(),
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "loadavg_1min_at_end": loadavg(), **payload,
    }
    path = results / f"{name}.json"
    path.write_text(json.dumps(out, indent=2, default=_json_default) + "\n")
    print(f"\nwrote {path}")
    return path


def _json_default(o: object) -> object:
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def disk_bytes(path: str | Path) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def zarr_array_bytes(path: str | Path) -> dict[str, int]:
    """Bytes of each array's chunk files (metadata files excluded) in a Zarr v3 cache."""
    out = {}
    for d in sorted(Path(path).iterdir()):
        if d.is_dir():
            out[d.name] = sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and f.name != "zarr.json")
    return out


def h5_array_bytes(path: str | Path) -> dict[str, int]:
    """Bytes of each dataset's stored chunks in an HDF5 cache."""
    import h5py

    with h5py.File(path, "r") as f:
        return {name: int(f[name].id.get_storage_size()) for name in f}


def drop_page_cache(path: str | Path) -> None:
    """Evict a cache's files from the OS page cache (posix_fadvise DONTNEED; no root needed), so the
    next read really comes from the disk."""
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- subprocess peak RSS
def run_measured(cmd: list[str], *, env: dict | None = None, cwd: str | Path = REPO, log: Path | None = None,
                 poll_s: float = 0.05) -> dict:
    """Run `cmd`, returning its exit code, wall time, CPU time (user + sys), peak RSS (the kernel's
    ru_maxrss of that one child, from wait4) and a sampled RSS trace (VmRSS from /proc every `poll_s`)."""
    full_env = {**os.environ, **(env or {})}
    log = log or Path(os.devnull)
    with open(log, "w") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=full_env, cwd=str(cwd), stdout=out, stderr=subprocess.STDOUT)
        trace: list[tuple[float, int]] = []
        stop = threading.Event()

        def poll() -> None:
            status = f"/proc/{p.pid}/status"
            while not stop.is_set():
                try:
                    with open(status) as f:
                        for line in f:
                            if line.startswith("VmRSS:"):
                                trace.append((time.perf_counter() - t0, int(line.split()[1]) * 1024))
                                break
                except OSError:
                    return
                stop.wait(poll_s)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
        p.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": p.returncode, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
            "peak_rss_bytes": ru.ru_maxrss * 1024, "trace": trace,
            "cmd": " ".join(map(shlex.quote, cmd))}


def venv_bin(name: str) -> str:
    """A console script of the running interpreter's venv (kdcache, kdtrain)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def proc_status_bytes(key: str) -> int:
    """A byte figure of this process from /proc/self/status (e.g. VmRSS, VmHWM); -1 when absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return -1
