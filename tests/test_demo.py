"""`kdcache demo`, the README's first command, end to end at one epoch per model."""

import os

from click.testing import CliRunner

from kdcache.cli import kdcache_main


def test_demo_runs_every_stage_and_prints_the_table(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(kdcache_main, ["demo", "--out", str(out), "--teacher-epochs", "1", "--student-epochs", "1",
                                          "--quiet"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    rows = [line for line in lines if line.startswith("| ") and "%" in line]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| cifar_resnet18", "teacher (labels)"],
        ["| mlp", "scratch (labels)"], ["| mlp", "KD from cache (full)"], ["| mlp", "KD from cache (top3)"],
        ["| vit_nano", "scratch (labels)"], ["| vit_nano", "KD from cache (full)"], ["| vit_nano", "KD from cache (top3)"],
    ]
    # distilled students report their agreement with the teacher (from the test cache); scratch students do not
    assert all(("—" in row) == ("scratch" in row or "teacher" in row) for row in rows)
    assert sorted(p for p in os.listdir(out) if p.endswith(".zarr")) == ["test-full.zarr", "train-full.zarr",
                                                                        "train-top3.zarr"]
    assert (out / "results.md").read_text().strip() == "\n".join(lines[lines.index(rows[0]) - 2:
                                                                       lines.index(rows[-1]) + 1])
    assert lines[-1].startswith("total ") and lines[-1].endswith(f"s; runs, caches and plots in {out}/")
