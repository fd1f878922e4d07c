"""Crash safety of `kdcache dump`: real `kill -9`s at chosen points, then `--resume` gives the same bytes.

Each kill point is made deterministic without touching kdcache: the dump runs as
`python -c "import killhook; from kdcache.cli import kdcache_main; kdcache_main()" dump ...` and
`killhook.py` (written into tmp_path, on PYTHONPATH) patches one kdcache function to write a marker
file and sleep at the chosen moment. The test waits for the marker, sends SIGKILL, checks what was
left on disk with plain zarr, resumes with the same command plus `--resume`, and compares every array
(plain zarr/h5py reads) with an uninterrupted dump.

All kill scenarios start at once from a module fixture: one helper process imports kdcache once and
forks one child per scenario, which runs exactly the command above (see KILLSERVER), so the module
costs about one interpreter start; the resumes run in-process.

Also here: the write lock (a second dump refused; a SIGKILLed holder does not leave it stuck),
ENOSPC from the chunk writer, and an output folder the dump cannot write to.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr
from clitools import assert_same_arrays, error_line, invoke, read_plain, tree_hash

from kdcache.cli import kdcache_main, kdtrain_main

N, ROWS, N_CHUNKS = 1437, 128, 12
NOBODY = 65534
MARKER_TIMEOUT_S = 240  # generous: seven torch imports share two cores, maybe beside other test runs

KILLHOOK = r'''
"""Test hook: make a `kdcache dump` hang (after writing $KILLHOOK_MARKER) at point $KILLHOOK_POINT."""
import os
import time

import numpy as np

POINT = os.environ.get("KILLHOOK_POINT", "")
MARKER = os.environ.get("KILLHOOK_MARKER", "")


def hang():
    with open(MARKER + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(MARKER + ".tmp", MARKER)
    time.sleep(600)
    os._exit(97)  # never reached in a passing test: the test SIGKILLs us first


if POINT in ("a", "b", "c", "lock", "train"):
    from kdcache.io import writer

    _orig_write_chunk = writer.ChunkWriter._write_chunk

    def _write_chunk(self, c, sl, buf):
        if POINT == "a":                      # before the first chunk is written
            hang()
        if POINT == "b" and c == 5:           # mid-chunk: values of chunk 5 written, checksum/done not
            self.store["values"][sl] = buf.arrays["values"]
            hang()
        _orig_write_chunk(self, c, sl, buf)
        if POINT in ("c", "lock", "train") and c == 7:  # just after chunk 7 is marked done
            hang()

    writer.ChunkWriter._write_chunk = _write_chunk

elif POINT == "d":                            # finalisation: all chunks done, status not flipped yet
    from kdcache.io import output as finalize

    def _cache_stats(store, layout):
        hang()

    finalize.cache_stats = _cache_stats

elif POINT == "e":                            # HDF5 conversion half way: a partial .h5.tmp on disk
    import h5py

    from kdcache.io import output as finalize

    def _write_hdf5(src, dest, compressor, attrs):
        f = h5py.File(dest, "w")
        f.create_dataset("values", data=np.asarray(src["values"][:300]))
        f.flush()
        hang()

    finalize.write_hdf5 = _write_hdf5  # finalize imported it by name: patch it where it is looked up
'''

KILLDS = r'''
"""digits/train that hangs (after writing $KILLHOOK_MARKER) when the teacher loop asks for item 700."""
import os

from kdcache.data.datasets import ArrayDataset, open_dataset


class HangingDigits(ArrayDataset):
    def __getitem__(self, i):
        if os.environ.get("KILLHOOK_POINT") == "f" and int(i) == 700:
            import killhook

            killhook.hang()
        return super().__getitem__(i)


def digits(split, root=None):
    d = open_dataset("digits", split)
    return HangingDigits(d.info, d.data, d.labels, d.layout)
'''


# --- helpers -------------------------------------------------------------------------------------

def _assert_same_arrays(path: str, ref: str) -> None:
    """A resumed cache equals the uninterrupted dump: every array byte for byte, and the same stats."""
    (got, got_attrs), (want, want_attrs) = read_plain(path), read_plain(ref)
    assert_same_arrays(got, want)
    assert got_attrs["status"] == "complete"
    assert got_attrs["stats"] == want_attrs["stats"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, save_teacher) -> Path:
    d = tmp_path_factory.mktemp("crash")
    save_teacher(d / "teacher.pt")
    (d / "killhook.py").write_text(KILLHOOK)
    (d / "killds.py").write_text(KILLDS)
    return d


def _dump_args(work: Path, out: str | Path, *extra) -> list[str]:
    return ["dump", "--teacher", "mlp", "--weights", str(work / "teacher.pt"), "--dataset", "digits",
            "--image-size", "8", "--chunk-rows", str(ROWS), "--device", "cpu", "--quiet", "--out", str(out),
            *map(str, extra)]


@pytest.fixture(scope="module")
def reference(work):
    """ref(suffix, *extra) -> path of an uninterrupted in-process dump with those options (memoised)."""
    made: dict[tuple, str] = {}

    def ref(suffix: str, *extra) -> str:
        key = (suffix, *map(str, extra))
        if key not in made:
            out = work / "ref" / f"ref{len(made)}{suffix}"
            out.parent.mkdir(exist_ok=True)
            r = invoke(kdcache_main, _dump_args(work, out, *extra))
            assert r.exit_code == 0, r.output
            made[key] = str(out)
        return made[key]

    return ref


KILLSERVER = r'''
"""Start every kill scenario's dump as a forked child of one process that imported kdcache once.

Each child sets KILLHOOK_POINT/KILLHOOK_MARKER, then runs exactly
`import killhook; from kdcache.cli import kdcache_main; kdcache_main()` with the dump's arguments; the
fork only saves each child the seconds of importing torch/torchvision again. This process reaps the
children and records how each one ended in <marker>.exit ("signal 9", "exit 1", ...).
"""
import json
import os
import sys

import h5py  # noqa: F401  imported before forking: everything a dump needs, no threads started yet
import zarr  # noqa: F401

import kdcache.ops.dump  # noqa: F401
import kdcache.io.output  # noqa: F401
from kdcache.cli import kdcache_main  # noqa: F401
from kdcache.data.datasets import open_dataset

open_dataset("digits", "train")  # loads (and caches) the embedded digits arrays


def child(sc):
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
            import killhook  # noqa: F401
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


def main():
    specs = json.loads(open(sys.argv[1]).read())
    pids = {}
    for sc in specs:
        pid = os.fork()
        if pid == 0:
            child(sc)
        pids[pid] = sc
    with open(sys.argv[1] + ".pids.tmp", "w") as f:
        json.dump({sc["point"]: pid for pid, sc in pids.items()}, f)
    os.replace(sys.argv[1] + ".pids.tmp", sys.argv[1] + ".pids")
    while pids:
        pid, status = os.wait()
        sc = pids.pop(pid, None)
        if sc is None:
            continue
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
        with open(sc["marker"] + ".exit", "w") as f:
            f.write(how)


main()
'''


@dataclass
class Scenario:
    point: str
    suffix: str
    extra: tuple
    pid: int = 0
    out: str = ""
    marker: str = ""
    args: list | None = None

    def ended(self) -> str | None:
        p = self.marker + ".exit"
        return Path(p).read_text() if os.path.exists(p) else None

    def log(self) -> str:
        p = self.marker + ".log"
        return Path(p).read_text() if os.path.exists(p) else ""


# point -> (output suffix, extra dump options): varied so the kills cover full/top-k, views and both backends
SCENARIOS = {
    "a": (".zarr", ()),
    "b": (".zarr", ("--topk", 3)),
    "c": (".zarr", ("--views", 2, "--augment", "flip", "--seed", 3)),
    "d": (".zarr", ("--topk", 3)),
    "e": (".h5", ("--topk", 3)),
    "f": (".h5", ("--dataset", "killds:digits")),
    "lock": (".zarr", ()),
    "train": (".zarr", ()),  # hangs like c; its partial cache is handed to kdtrain with the default --cache-ram
}
KILL_POINTS = ["a", "b", "c", "d", "e", "f"]


def _wait_until(cond, what: str, timeout: float = MARKER_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def scenarios(work):
    """Start every kill scenario's dump at once (see KILLSERVER); SIGKILL any left over at the end."""
    (work / "killserver.py").write_text(KILLSERVER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(work), *filter(None, [env.get("PYTHONPATH")])])
    started: dict[str, Scenario] = {}
    for point, (suffix, extra) in SCENARIOS.items():
        sc = Scenario(point, suffix, extra, out=str(work / f"kill-{point}{suffix}"),
                      marker=str(work / f"kill-{point}.marker"))
        sc.args = _dump_args(work, sc.out, *extra)
        started[point] = sc
    spec = work / "scenarios.json"
    specs = [{"point": sc.point, "marker": sc.marker, "args": sc.args} for sc in started.values()]
    public = None
    if os.geteuid() == 0:  # root ignores chmod: the unwritable-folder dump runs as `nobody` instead
        public = Path(tempfile.mkdtemp(prefix="kdcache-ro-"))
        public.chmod(0o755)
        shutil.copy(work / "teacher.pt", public / "teacher.pt")
        (public / "teacher.pt").chmod(0o644)
        (public / "ro").mkdir(mode=0o555)
        (public / "ro").chmod(0o555)
        args = _dump_args(work, public / "ro" / "c.zarr")
        args[args.index("--weights") + 1] = str(public / "teacher.pt")
        sc = started["ro"] = Scenario("ro", ".zarr", (), out=str(public / "ro" / "c.zarr"),
                                      marker=str(work / "kill-ro.marker"), args=args)
        specs.append({"point": "ro", "marker": sc.marker, "args": args, "uid": NOBODY})
    spec.write_text(json.dumps(specs))
    with open(work / "killserver.log", "w") as server_log:  # the server keeps its own copy of the descriptor
        server = subprocess.Popen([sys.executable, str(work / "killserver.py"), str(spec)], cwd=work, env=env,
                                  stdout=server_log, stderr=subprocess.STDOUT)
    pids = Path(str(spec) + ".pids")
    try:
        _wait_until(lambda: pids.exists() or server.poll() is not None, "kill scenarios started")
        if not pids.exists():
            pytest.fail(f"the kill scenario server failed:\n{(work / 'killserver.log').read_text()}")
        for point, pid in json.loads(pids.read_text()).items():
            started[point].pid = pid
        yield started
    finally:
        for sc in started.values():  # only the children this fixture started, by pid, while still unreaped
            if sc.pid and sc.ended() is None:
                try:
                    os.kill(sc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        server.wait(timeout=60)
        if public is not None:
            shutil.rmtree(public, ignore_errors=True)


def _wait_for_marker(sc: Scenario) -> None:
    def reached() -> bool:
        if sc.ended() is not None:
            pytest.fail(f"dump for kill point {sc.point} ended ({sc.ended()}) before reaching it:\n{sc.log()}")
        return os.path.exists(sc.marker)

    _wait_until(reached, f"kill point {sc.point} reached")
    assert Path(sc.marker).read_text() == str(sc.pid)


def _sigkill(sc: Scenario) -> None:
    os.kill(sc.pid, signal.SIGKILL)
    _wait_until(lambda: sc.ended() is not None, f"kill point {sc.point}: killed dump reaped", 60)
    assert sc.ended() == f"signal {int(signal.SIGKILL)}"


def _kdtrain(cache: str, out, *extra):
    return invoke(kdtrain_main, ["--cache", cache, "--student", "mlp", "--student-arg", "hidden=(8,)", "--epochs", 1,
                               "--quiet", "--no-plots", "--device", "cpu", "--out", out, *extra])


def _stage(sc: Scenario) -> str:
    return sc.out if sc.suffix == ".zarr" else sc.out + ".partial.zarr"


# --- kill -9 at six points, then --resume ---------------------------------------------------------

@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_then_resume_is_byte_identical(scenarios, reference, work, monkeypatch, point):
    monkeypatch.syspath_prepend(str(work))  # killds (point f) for the in-process commands
    sc = scenarios[point]
    _wait_for_marker(sc)
    _sigkill(sc)

    # what the kill left: a partial staging Zarr whose done map marks whole chunks only
    stage = _stage(sc)
    g = zarr.open_group(stage, mode="r")
    attrs = dict(g.attrs["kdcache"])
    assert attrs["status"] == "partial" and "stats" not in attrs
    done = np.asarray(g["done"][...])
    expected_done = {"a": 0, "b": 5, "c": 8, "d": N_CHUNKS, "e": N_CHUNKS}
    if point in expected_done:
        assert done.tolist() == [1] * expected_done[point] + [0] * (N_CHUNKS - expected_done[point])
    else:  # f: hung fetching row 700 (chunk 5); the writer thread may still have been on chunk 4
        k = int(done.sum())
        assert done.tolist() == [1] * k + [0] * (N_CHUNKS - k) and 3 <= k <= 5
    if point == "b":  # the half-written chunk: its values are there, its checksum and done flag are not
        assert np.asarray(g["values"][5 * ROWS:6 * ROWS]).any() and not np.asarray(g["checksum"][5]).any()
    crcs = np.asarray(g["checksum"][...])
    assert (crcs[done == 1] != 0).all()
    if sc.suffix == ".h5":
        assert not os.path.exists(sc.out), "an HDF5 cache on disk must always be complete"
        if point == "e":
            assert os.path.exists(sc.out + ".tmp")  # the conversion's half-written file, never the final path

    # the interrupted cache is reported partial, and kdtrain refuses it
    r = invoke(kdcache_main, ["info", stage])
    assert r.exit_code == 0 and "partial" in r.output and "--resume" in r.output, r.output
    if sc.suffix == ".h5":
        line = error_line(invoke(kdcache_main, ["info", sc.out]))
        assert "partial" in line and "--resume" in line
    line = error_line(_kdtrain(sc.out, work / f"run-{point}", "--cache-ram", 0))
    assert "partial" in line and "--resume" in line

    # the same command again without --resume is refused and changes nothing
    before = tree_hash(stage)
    line = error_line(invoke(kdcache_main, sc.args))
    assert "--resume" in line
    assert tree_hash(stage) == before

    # --resume (same command) finishes it: byte-identical to a dump that was never interrupted
    r = invoke(kdcache_main, [*sc.args, "--resume"])
    assert r.exit_code == 0, r.output
    extra = [a for a in sc.extra if a != "killds:digits" and a != "--dataset"]
    _assert_same_arrays(sc.out, reference(sc.suffix, *extra))
    assert not os.path.exists(sc.out + ".lock")
    if sc.suffix == ".h5":
        assert not os.path.exists(sc.out + ".partial.zarr") and not os.path.exists(sc.out + ".tmp")
    assert invoke(kdcache_main, ["verify", sc.out]).exit_code == 0


# --- the write lock -------------------------------------------------------------------------------

def test_second_dump_refused_and_lock_not_stuck_after_sigkill(scenarios, reference):
    sc = scenarios["lock"]
    _wait_for_marker(sc)  # the first dump holds the lock, hung after chunk 7
    for flags in ([], ["--resume"], ["--overwrite"]):
        line = error_line(invoke(kdcache_main, [*sc.args, *flags]))
        assert "another dump" in line and f"pid {sc.pid}" in line
    assert sc.ended() is None, "the refused dumps must not disturb the one holding the lock"

    _sigkill(sc)
    assert os.path.exists(sc.out + ".lock")  # the file stays, but the OS dropped the flock with the process
    r = invoke(kdcache_main, [*sc.args, "--resume"])
    assert r.exit_code == 0, r.output
    assert not os.path.exists(sc.out + ".lock")
    _assert_same_arrays(sc.out, reference(".zarr"))


def test_kdtrain_refuses_a_killed_dump_as_partial_not_corrupt(scenarios, work):
    """With the default --cache-ram the cache would be loaded whole: a partial one must be refused as partial
    first, not reported corrupt because its unwritten chunks fail their checksums."""
    sc = scenarios["train"]
    _wait_for_marker(sc)
    _sigkill(sc)
    line = error_line(_kdtrain(sc.out, work / "run-train"))  # default --cache-ram 1GiB: loaded whole
    assert "partial" in line and "--resume" in line and "corrupt" not in line


# --- ENOSPC ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_disk_full_is_one_clean_line_then_resume_completes(work, reference, tmp_path, monkeypatch, suffix):
    from kdcache.io import writer

    orig = writer.ChunkWriter._write_chunk

    def full_disk(self, c, sl, buf):
        if c >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        orig(self, c, sl, buf)

    out = str(tmp_path / f"full{suffix}")
    args = _dump_args(work, out, "--topk", 3)
    monkeypatch.setattr(writer.ChunkWriter, "_write_chunk", full_disk)
    line = error_line(invoke(kdcache_main, args))
    assert "No space left" in line and "--resume" in line
    stage = out if suffix == ".zarr" else out + ".partial.zarr"
    g = zarr.open_group(stage, mode="r")
    assert g.attrs["kdcache"]["status"] == "partial"
    assert np.asarray(g["done"][...]).tolist() == [1, 1, 1] + [0] * (N_CHUNKS - 3)
    assert not os.path.exists(out + ".lock")
    if suffix == ".h5":
        assert not os.path.exists(out)

    monkeypatch.setattr(writer.ChunkWriter, "_write_chunk", orig)
    r = invoke(kdcache_main, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    _assert_same_arrays(out, reference(suffix, "--topk", 3))


# --- an output folder the dump cannot write to -----------------------------------------------------

LOCK_BUG = ("kdcache bug: an --out the dump cannot create ends in a traceback, not a one-line error: "
            "cache/store.py ensure_parent (os.makedirs) raises FileExistsError/NotADirectoryError under a regular "
            "file, and cache/lock.py WriteLock.__enter__ (os.open of <out>.lock) raises PermissionError in an "
            "unwritable folder; catch OSError in both and raise KDCacheError naming the folder")


def test_unwritable_output_folder_is_one_clean_line(scenarios, work, tmp_path):
    """chmod 0o500 on the parent; as root (chmod ignored) the same dump runs as `nobody`, forked above."""
    if os.geteuid() != 0:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o500)
        try:
            if os.access(parent, os.W_OK):
                pytest.skip("chmod 0o500 does not stop writes here")
            line = error_line(invoke(kdcache_main, _dump_args(work, parent / "c.zarr")))
        finally:
            parent.chmod(0o700)
    else:
        sc = scenarios["ro"]
        _wait_until(lambda: sc.ended() is not None, "the dump as nobody ended")
        err = sc.log()
        assert sc.ended() == "exit 1", (sc.ended(), err)
        assert "Traceback" not in err, err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        line = lines[0]
        parent = Path(sc.out).parent
    assert str(parent) in line
    assert not os.path.exists(parent / "c.zarr")


def test_output_under_a_regular_file_is_one_clean_line(work, tmp_path):
    (tmp_path / "plain-file").write_text("x")
    out = tmp_path / "plain-file" / "c.h5"
    line = error_line(invoke(kdcache_main, _dump_args(work, out)))
    assert "plain-file" in line
