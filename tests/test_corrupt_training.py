"""kdtrain streaming a cache (`--cache-ram 0`) that meets a corrupt chunk stops with one line naming the chunk,
and leaves no checkpoint claiming an epoch it did not finish."""

from __future__ import annotations

import re

import pytest
import torch
from clitools import copy_cache, dump_args, error_line, flip_byte, invoke, zarr_chunk_file

from kdcache.cli import kdcache_main, kdtrain_main


@pytest.fixture(scope="module")
def raw_cache(tmp_path_factory, save_teacher) -> str:
    """An uncompressed top-3 digits cache with 128-row chunks: a flipped byte in a chunk file is silent data damage."""
    d = tmp_path_factory.mktemp("corrupt")
    weights = save_teacher(d / "teacher.pt")
    r = invoke(kdcache_main, dump_args(weights, d / "raw.zarr", "--topk", 3, "--compressor", "none", chunk_rows=128))
    assert r.exit_code == 0, r.output
    return str(d / "raw.zarr")


def _kdtrain(cache: str, out, *extra):
    return invoke(kdtrain_main, ["--cache", cache, "--student", "mlp", "--student-arg", "hidden=(8,)",
                               "--cache-ram", 0, "--batch-size", 256, "--quiet", "--no-plots", "--device", "cpu",
                               "--out", out, *extra])


def test_kdtrain_stops_at_a_corrupt_chunk_with_one_line(raw_cache, tmp_path):
    path = copy_cache(raw_cache, tmp_path)
    flip_byte(zarr_chunk_file(path), 300)
    run = tmp_path / "run"
    line = error_line(_kdtrain(path, run, "--epochs", 2))
    assert re.search(r"chunk 5 \(rows 640-767, view 0\) of .*raw\.zarr fails its checksum", line), line
    assert "kdcache verify" in line
    assert not (run / "last.pt").exists() and not (run / "metrics.json").exists()


def test_kdtrain_corrupt_chunk_in_epoch_2_keeps_epoch_1_checkpoint(raw_cache, tmp_path, monkeypatch):
    """The chunk goes bad on disk after epoch 1 (a tiny LRU makes epoch 2 read it again)."""
    from kdcache.io import reader
    from kdcache.train import recipe, run_dir

    path = copy_cache(raw_cache, tmp_path)
    monkeypatch.setattr(recipe, "open_cache", lambda p, require_complete=True: reader.open_cache(
        p, require_complete=require_complete, lru_bytes=0))
    orig_end = run_dir.RunDir.end_epoch

    def end_epoch(self, row, *a, **kw):
        best = orig_end(self, row, *a, **kw)
        if row["epoch"] == 1:
            flip_byte(zarr_chunk_file(path), 300)
        return best

    monkeypatch.setattr(run_dir.RunDir, "end_epoch", end_epoch)
    run = tmp_path / "run"
    line = error_line(_kdtrain(path, run, "--epochs", 3))
    assert re.search(r"chunk 5 \(rows 640-767, view 0\) of .* fails its checksum", line), line
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and best["epoch"] == 1
    assert all(torch.equal(last["model"][k], best["model"][k]) for k in best["model"])
    assert len((run / "log.csv").read_text().splitlines()) == 2  # header + epoch 1
    assert not (run / "metrics.json").exists()
    # and the epoch-1 checkpoint still resumes once the cache is sound again
    flip_byte(zarr_chunk_file(path), 300)
    r = _kdtrain(path, run, "--epochs", 2, "--resume")
    assert r.exit_code == 0, r.output
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 2

