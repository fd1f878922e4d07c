"""Crash safety of `kdcache dump`: real `kill -9`s at chosen points, then `--resume` gives the same bytes.

Each kill point is made deterministic without touching kdcache: the dump runs as
`import killhook; from kdcache.cli import kdcache_main; kdcache_main()` with the dump's arguments, and
tests/killhook.py (inert unless KILLHOOK_POINT is set) patches one kdcache function to write a marker file
and sleep at the chosen moment; point f hangs in the dataset instead (tests/killds.py). The test waits for
the marker, sends SIGKILL, checks what was left on disk with plain zarr, resumes with the same command plus
`--resume`, and compares every array (plain zarr/h5py reads) with an uninterrupted dump.

All kill scenarios start at once from a module fixture: tests/killserver.py imports kdcache once and forks
one child per scenario, which runs exactly the command above, so the module costs about one interpreter
start; the resumes run in-process.

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
import tokenplug
import torch
import zarr
from clitools import assert_same_arrays, dump_args, error_line, invoke, read_plain, tree_hash

from kdcache.cli import kdcache_main, kdtrain_main

N, ROWS, N_CHUNKS = 1437, 128, 12
NOBODY = 65534
MARKER_TIMEOUT_S = 240  # generous: seven torch imports share two cores, maybe beside other test runs
TESTS_DIR = Path(__file__).resolve().parent  # killserver.py, and killhook.py / killds.py for its children


# --- helpers -------------------------------------------------------------------------------------

def _assert_same_arrays(path: str, ref: str) -> None:
    """A resumed cache equals the uninterrupted dump: every array byte for byte, and the same stats."""
    (got, got_attrs), (want, want_attrs) = read_plain(path), read_plain(ref)
    assert_same_arrays(got, want)
    assert got_attrs["status"] == "complete"
    assert got_attrs["stats"] == want_attrs["stats"]


@pytest.fixture(scope="module")
def crash_dir(tmp_path_factory, save_teacher) -> Path:
    """This module's scratch folder, holding teacher.pt (a random-weights 8 px mlp for digits)."""
    d = tmp_path_factory.mktemp("crash")
    save_teacher(d / "teacher.pt")
    torch.save(tokenplug.successor(tokenplug.VOCAB, (tokenplug.LENGTH,), tokenplug.VOCAB).state_dict(),
               d / "successor.pt")
    return d


def _source(crash_dir: Path, dataset: str) -> dict:
    """dump_args options for a scenario's data: the digits mlp, or (token caches) the counting successor."""
    if dataset.startswith("tokenplug:"):
        return {"teacher": "tokenplug:successor", "weights": crash_dir / "successor.pt", "image_size": None,
                "chunk_rows": 8, "dataset": dataset}  # 96 sequences in 12 chunks, as digits
    return {"weights": crash_dir / "teacher.pt", "chunk_rows": ROWS, "dataset": dataset}


@pytest.fixture(scope="module")
def uninterrupted(crash_dir):
    """ref(suffix, *extra) -> path of an uninterrupted in-process dump of digits with those options (memoised)."""
    made: dict[tuple, str] = {}

    def ref(suffix: str, *extra, dataset: str = "digits") -> str:
        key = (suffix, dataset, *map(str, extra))
        if key not in made:
            out = crash_dir / "ref" / f"ref{len(made)}{suffix}"
            out.parent.mkdir(exist_ok=True)
            src = _source(crash_dir, dataset)
            r = invoke(kdcache_main, dump_args(src.pop("weights"), out, *extra, **src))
            assert r.exit_code == 0, r.output
            made[key] = str(out)
        return made[key]

    return ref


@dataclass
class Scenario:
    point: str
    suffix: str
    dataset: str
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


# point -> (output suffix, --dataset, extra dump options): varied so the kills cover full/top-k, views and both
# backends. killds:digits is digits that hangs at point f (tests/killds.py); the same samples otherwise.
SCENARIOS = {
    "a": (".zarr", "digits", ()),
    "b": (".zarr", "digits", ("--topk", 3)),
    "c": (".zarr", "digits", ("--views", 2, "--augment", "flip", "--seed", 3)),
    "d": (".zarr", "digits", ("--topk", 3)),
    "e": (".h5", "digits", ("--topk", 3)),
    "f": (".h5", "killds:digits", ()),
    "g": (".zarr", "tokenplug:counting", ("--topk", 8)),  # a token cache with q8 values
    "lock": (".zarr", "digits", ()),
    "train": (".zarr", "digits", ()),  # hangs like c; its partial cache goes to kdtrain with the default --cache-ram
}
KILL_POINTS = ["a", "b", "c", "d", "e", "f", "g"]


def _wait_until(cond, what: str, timeout: float = MARKER_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def scenarios(crash_dir):
    """Start every kill scenario's dump at once (tests/killserver.py); SIGKILL any left over at the end."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), *filter(None, [env.get("PYTHONPATH")])])
    started: dict[str, Scenario] = {}
    for point, (suffix, dataset, extra) in SCENARIOS.items():
        sc = Scenario(point, suffix, dataset, extra, out=str(crash_dir / f"kill-{point}{suffix}"),
                      marker=str(crash_dir / f"kill-{point}.marker"))
        src = _source(crash_dir, dataset)
        sc.args = dump_args(src.pop("weights"), sc.out, *extra, **src)
        started[point] = sc
    spec = crash_dir / "scenarios.json"
    specs = [{"point": sc.point, "marker": sc.marker, "args": sc.args} for sc in started.values()]
    public = None
    if os.geteuid() == 0:  # root ignores chmod: the unwritable-folder dump runs as `nobody` instead
        public = Path(tempfile.mkdtemp(prefix="kdcache-ro-"))
        public.chmod(0o755)
        shutil.copy(crash_dir / "teacher.pt", public / "teacher.pt")
        (public / "teacher.pt").chmod(0o644)
        (public / "ro").mkdir(mode=0o555)
        (public / "ro").chmod(0o555)
        out = public / "ro" / "c.zarr"
        args = dump_args(public / "teacher.pt", out, chunk_rows=ROWS)
        sc = started["ro"] = Scenario("ro", ".zarr", "digits", (), out=str(out),
                                      marker=str(crash_dir / "kill-ro.marker"), args=args)
        specs.append({"point": "ro", "marker": sc.marker, "args": args, "uid": NOBODY})
    spec.write_text(json.dumps(specs))
    with open(crash_dir / "killserver.log", "w") as server_log:  # the server keeps its own copy of the descriptor
        server = subprocess.Popen([sys.executable, str(TESTS_DIR / "killserver.py"), str(spec)], cwd=crash_dir,
                                  env=env, stdout=server_log, stderr=subprocess.STDOUT)
    pids = Path(str(spec) + ".pids")
    try:
        _wait_until(lambda: pids.exists() or server.poll() is not None, "kill scenarios started")
        if not pids.exists():
            pytest.fail(f"the kill scenario server failed:\n{(crash_dir / 'killserver.log').read_text()}")
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
def test_sigkill_then_resume_is_byte_identical(scenarios, uninterrupted, crash_dir, point):
    sc = scenarios[point]
    _wait_for_marker(sc)
    _sigkill(sc)

    # what the kill left: a partial staging Zarr whose done map marks whole chunks only
    stage = _stage(sc)
    g = zarr.open_group(stage, mode="r")
    attrs = dict(g.attrs["kdcache"])
    assert attrs["status"] == "partial" and "stats" not in attrs
    done = np.asarray(g["done"][...])
    expected_done = {"a": 0, "b": 5, "c": 8, "d": N_CHUNKS, "e": N_CHUNKS, "g": 8}
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
    line = error_line(_kdtrain(sc.out, crash_dir / f"run-{point}", "--cache-ram", 0))
    assert "partial" in line and "--resume" in line

    # the same command again without --resume is refused and changes nothing
    before = tree_hash(stage)
    line = error_line(invoke(kdcache_main, sc.args))
    assert "--resume" in line
    assert tree_hash(stage) == before

    # --resume (same command) finishes it: byte-identical to a dump that was never interrupted
    r = invoke(kdcache_main, [*sc.args, "--resume"])
    assert r.exit_code == 0, r.output
    _assert_same_arrays(sc.out, uninterrupted(sc.suffix, *sc.extra, dataset=sc.dataset))
    assert not os.path.exists(sc.out + ".lock")
    if sc.suffix == ".h5":
        assert not os.path.exists(sc.out + ".partial.zarr") and not os.path.exists(sc.out + ".tmp")
    assert invoke(kdcache_main, ["verify", sc.out]).exit_code == 0


# --- the write lock -------------------------------------------------------------------------------

def test_second_dump_refused_and_lock_not_stuck_after_sigkill(scenarios, uninterrupted):
    sc = scenarios["lock"]
    _wait_for_marker(sc)  # the first dump holds the lock, hung after chunk 7
    for flags in ([], ["--resume"], ["--overwrite"]):
        line = error_line(invoke(kdcache_main, [*sc.args, *flags]))
        assert "another kdcache process is writing" in line and f"pid {sc.pid}" in line
    assert sc.ended() is None, "the refused dumps must not disturb the one holding the lock"

    _sigkill(sc)
    assert os.path.exists(sc.out + ".lock")  # the file stays, but the OS dropped the flock with the process
    r = invoke(kdcache_main, [*sc.args, "--resume"])
    assert r.exit_code == 0, r.output
    assert not os.path.exists(sc.out + ".lock")
    _assert_same_arrays(sc.out, uninterrupted(".zarr"))


def test_kdtrain_refuses_a_killed_dump_as_partial_not_corrupt(scenarios, crash_dir):
    """With the default --cache-ram the cache would be loaded whole: a partial one must be refused as partial
    first, not reported corrupt because its unwritten chunks fail their checksums."""
    sc = scenarios["train"]
    _wait_for_marker(sc)
    _sigkill(sc)
    line = error_line(_kdtrain(sc.out, crash_dir / "run-train"))  # default --cache-ram 1GiB: loaded whole
    assert "partial" in line and "--resume" in line and "corrupt" not in line


# --- ENOSPC ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_disk_full_is_one_clean_line_then_resume_completes(crash_dir, uninterrupted, tmp_path, monkeypatch, suffix):
    from kdcache.io import writer

    orig = writer.ChunkWriter._write_chunk

    def full_disk(self, c, sl, buf):
        if c >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        orig(self, c, sl, buf)

    out = str(tmp_path / f"full{suffix}")
    args = dump_args(crash_dir / "teacher.pt", out, "--topk", 3, chunk_rows=ROWS)
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
    _assert_same_arrays(out, uninterrupted(suffix, "--topk", 3))


# --- an output folder the dump cannot write to -----------------------------------------------------

def test_unwritable_output_folder_is_one_clean_line(scenarios, crash_dir, tmp_path):
    """An --out in a folder the dump may not write to: one `error:` line naming the folder, nothing created.

    The folder is chmod 0o500; as root (which chmod does not stop) the same dump runs as `nobody` instead, one
    of the scenarios forked by tests/killserver.py."""
    if os.geteuid() != 0:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o500)
        try:
            if os.access(parent, os.W_OK):
                pytest.skip("chmod 0o500 does not stop writes here")
            line = error_line(invoke(kdcache_main, dump_args(crash_dir / "teacher.pt", parent / "c.zarr",
                                                             chunk_rows=ROWS)))
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


def test_output_under_a_regular_file_is_one_clean_line(crash_dir, tmp_path):
    """An --out below a regular file: one `error:` line naming that file."""
    (tmp_path / "plain-file").write_text("x")
    out = tmp_path / "plain-file" / "c.h5"
    line = error_line(invoke(kdcache_main, dump_args(crash_dir / "teacher.pt", out, chunk_rows=ROWS)))
    assert "plain-file" in line
