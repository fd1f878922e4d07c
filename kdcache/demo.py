"""`kdcache demo`: the whole pipeline on the embedded digits data, ending in one results table.

teacher (kdtrain, no cache) → kdcache dump of the train split (full and top-k) and of the test split (full,
for the students' agreement with the teacher) → students from scratch and distilled from each train cache.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from kdcache.config import DemoConfig, DumpConfig, LossConfig, TrainConfig
from kdcache.errors import KDCacheError
from kdcache.ops.dump import run_dump
from kdcache.train.recipe import run_train


@dataclass
class Row:
    model: str
    method: str
    top1: float
    ece: float
    agreement: float | None
    seconds: float


def _train(cfg: DemoConfig, name: str, student: str, args: tuple, epochs: int, caches: tuple[str, ...] = (),
           test_cache: str | None = None, loss: str = "auto") -> dict:
    return run_train(TrainConfig(
        student=student, student_args=dict(args), caches=caches, test_cache=test_cache,
        image_size=cfg.image_size, loss=LossConfig(loss, cfg.alpha, cfg.temperature), epochs=epochs,
        batch_size=64, seed=cfg.seed, out=os.path.join(cfg.out, name), overwrite=True, progress=cfg.progress,
        command=f"kdcache demo ({name})"))


def _row(model: str, method: str, r: dict) -> Row:
    f = r["final"]
    return Row(model, method, f["test_top1"], f["test_ece"], f.get("agreement"), r["wall_seconds"])


def run_demo(cfg: DemoConfig) -> list[Row]:
    """Run every stage; returns the table's rows (also written to OUT/results.md)."""
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise KDCacheError(f"--out {cfg.out} is a file, not a directory: choose another --out")
    os.makedirs(cfg.out, exist_ok=True)
    rows = []
    teacher = _train(cfg, "teacher", cfg.teacher, cfg.teacher_args, cfg.teacher_epochs)
    rows.append(_row(cfg.teacher, "teacher (labels)", teacher))
    weights = os.path.join(cfg.out, "teacher", "best.pt")
    caches = {}
    for split, kind, k in (("train", "full", None), ("train", f"top{cfg.topk}", cfg.topk), ("test", "full", None)):
        path = os.path.join(cfg.out, f"{split}-{kind}.zarr")
        t0 = time.perf_counter()
        run_dump(DumpConfig(teacher=cfg.teacher, weights=weights, split=split, out=path, topk=k,
                            image_size=cfg.image_size, overwrite=True, progress=cfg.progress,
                            command=f"kdcache demo (dump {split} {kind})"))
        caches[(split, kind)] = path
        print(f"dumped {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    for student, args in cfg.students:
        rows.append(_row(student, "scratch (labels)", _train(cfg, f"{student}-scratch", student, args,
                                                             cfg.student_epochs)))
        for kind in ("full", f"top{cfg.topk}"):
            r = _train(cfg, f"{student}-kd-{kind}", student, args, cfg.student_epochs,
                       caches=(caches[("train", kind)],), test_cache=caches[("test", "full")])
            rows.append(_row(student, f"KD from cache ({kind})", r))
    table = format_table(rows)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(table + "\n")
    return rows


def format_table(rows: list[Row]) -> str:
    """A Markdown table: model, method, test top-1, ECE, agreement with the teacher, wall time."""
    head = "| model | method | test top-1 | ECE | agrees w/ teacher | wall s |\n|---|---|---:|---:|---:|---:|"
    body = [f"| {r.model} | {r.method} | {100 * r.top1:.2f}% | {r.ece:.3f} | "
            f"{'—' if r.agreement is None else f'{100 * r.agreement:.1f}%'} | {r.seconds:.1f} |" for r in rows]
    return "\n".join([head, *body])
