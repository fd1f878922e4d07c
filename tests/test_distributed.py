"""torchrun with gloo on CPU: a 2-process dump equals the 1-process dump byte for byte; DDP training resumes in 1."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import torch
import zarr
from clitools import dump_args

from kdcache.models import build_model

ARRAYS = ("values", "top", "codes", "indices", "tail", "labels", "views", "done", "checksum")


def _env(tmp_path) -> dict:
    return {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, *args: str, n: int = 2, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()),
           "-m", "kdcache", *args]
    return subprocess.Popen(cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kw)


def _children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (torchrun's worker processes)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return sorted(out)


def _run_ok(tmp_path, *args: str) -> str:
    """Run a torchrun job to success; one retry only if the rendezvous port was taken meanwhile."""
    for attempt in range(2):
        p = _torchrun(tmp_path, *args)
        out, err = p.communicate(timeout=300)
        if p.returncode == 0:
            return out
        if attempt == 0 and "address already in use" in err.lower():
            continue
        raise AssertionError(err[-3000:])
    return out


def _weights(tmp_path) -> str:
    torch.manual_seed(0)
    m = build_model("mlp", num_classes=10, input_shape=(3, 8, 8), hidden=(16,))
    path = str(tmp_path / "t.pt")
    torch.save({"model": m.state_dict(), "arch_args": {"hidden": (16,)}}, path)
    return path


def _same(a: str, b: str) -> None:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for name in ARRAYS:
        if name in ga:
            np.testing.assert_array_equal(ga[name][...], gb[name][...], err_msg=name)
    assert gb.attrs["kdcache"]["status"] == "complete"


def test_two_process_dump_is_byte_identical_and_training_resumes_in_one(tmp_path):
    w = _weights(tmp_path)
    single = subprocess.run([sys.executable, "-m", "kdcache", *dump_args(w, "one.zarr", "--topk", 3, chunk_rows=100)],
                            cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    out = _run_ok(tmp_path, *dump_args(w, "two.zarr", "--topk", 3, chunk_rows=100))
    assert out.count("wrote two.zarr") == 1  # rank 0 reports, once
    _same(str(tmp_path / "one.zarr"), str(tmp_path / "two.zarr"))

    train = ["train", "--cache", "two.zarr", "--student", "mlp", "--student-arg", "hidden=(32,)", "--batch-size",
             "64", "--quiet", "--no-plots", "--out", "run"]
    _run_ok(tmp_path, *train, "--epochs", "2")
    m = json.load(open(tmp_path / "run" / "metrics.json"))
    assert m["world_size"] == 2 and len(m["history"]) == 2
    assert m["history"][1]["train_loss"] < m["history"][0]["train_loss"]
    assert m["final"]["test_top1"] > 0.5  # well above chance (0.1) after two epochs
    resumed = subprocess.run([sys.executable, "-m", "kdcache", *train, "--epochs", "3", "--resume"], cwd=tmp_path,
                             env=_env(tmp_path), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    m = json.load(open(tmp_path / "run" / "metrics.json"))
    assert [r["epoch"] for r in m["history"]] == [1, 2, 3] and m["world_size"] == 1


def test_killed_sharded_dump_stays_partial_and_resumes_on_other_world_size(tmp_path):
    (tmp_path / "slowdigits.py").write_text(textwrap.dedent("""
        import time
        from kdcache.data.datasets import open_dataset

        class Slow:
            def __init__(self, ds):
                self.ds, self.info, self.labels = ds, ds.info, ds.labels
            def __len__(self):
                return len(self.ds)
            def __getitem__(self, i):
                time.sleep(0.01)
                return self.ds[i]
            def raw_bytes(self, i):
                return self.ds.raw_bytes(i)

        def make(split, root):
            return Slow(open_dataset("digits", split))
    """))
    w = _weights(tmp_path)
    args = dump_args(w, "k.zarr", "--topk", 3, "--batch-size", 50, dataset="slowdigits:make", chunk_rows=100)
    p = _torchrun(tmp_path, *args)
    done = None
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.2)
        try:
            done = zarr.open_group(str(tmp_path / "k.zarr"), mode="r")["done"][...]
        except Exception:  # not created yet
            continue
        if done.sum() >= 2:
            break
    ranks = _children(p.pid)
    assert len(ranks) == 2
    os.kill(ranks[-1], signal.SIGKILL)  # one rank dies; torchrun then stops the job
    p.communicate(timeout=120)
    assert p.returncode != 0
    g = zarr.open_group(str(tmp_path / "k.zarr"), mode="r")
    assert g.attrs["kdcache"]["status"] == "partial"
    assert 2 <= g["done"][...].sum() < len(done)
    # Finish it in one process (another world size), then compare with an uninterrupted dump.
    fin = subprocess.run([sys.executable, "-m", "kdcache", *args, "--resume"], cwd=tmp_path, env=_env(tmp_path),
                         capture_output=True, text=True)
    assert fin.returncode == 0, fin.stderr
    ref_args = dump_args(w, "ref.zarr", "--topk", 3, "--batch-size", 50, dataset="slowdigits:make", chunk_rows=100)
    ref = subprocess.run([sys.executable, "-m", "kdcache", *ref_args], cwd=tmp_path, env=_env(tmp_path),
                         capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    _same(str(tmp_path / "ref.zarr"), str(tmp_path / "k.zarr"))


def test_two_process_token_dump_is_byte_identical_and_trains_with_ddp(tmp_path):
    """A token cache (q8 values, one row per position) sharded over two ranks equals the one-process dump."""
    import shutil

    import torch

    import tokenplug

    shutil.copy(tokenplug.__file__, tmp_path / "tokenplug.py")
    torch.save(tokenplug.successor(tokenplug.VOCAB, (tokenplug.LENGTH,), tokenplug.VOCAB).state_dict(),
               tmp_path / "succ.pt")
    src = {"teacher": "tokenplug:successor", "image_size": None, "dataset": "tokenplug:counting", "chunk_rows": 8}
    single = subprocess.run([sys.executable, "-m", "kdcache", *dump_args("succ.pt", "one.zarr", "--topk", 8, **src)],
                            cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    _run_ok(tmp_path, *dump_args("succ.pt", "two.zarr", "--topk", 8, **src))
    _same(str(tmp_path / "one.zarr"), str(tmp_path / "two.zarr"))
    _run_ok(tmp_path, "train", "--cache", "two.zarr", "--dataset", "tokenplug:counting", "--student",
            "tokenplug:bigram", "--epochs", "2", "--lr", "0.05", "--batch-size", "16", "--quiet", "--no-plots",
            "--out", "run")
    m = json.load(open(tmp_path / "run" / "metrics.json"))
    assert m["world_size"] == 2 and m["history"][1]["train_loss"] < m["history"][0]["train_loss"]
    assert math.isfinite(m["final"]["test_ppl"])
