"""A training run's directory: checkpoints (best, last), CSV log, metrics.json, plots; resume from `last`."""

from __future__ import annotations

import csv
import json
import os
import shutil

import torch

from kdcache.errors import KDCacheError

RESUME_KEYS = ("student", "student_args", "num_classes", "input", "caches", "hint")  # what a resumed run must share
LOG_FIELDS = ("epoch", "train_loss", "test_top1", "test_ece", "test_nll", "test_ppl", "agreement", "lr",
              "train_seconds", "samples_per_s")  # log.csv's columns; metrics.json keeps every field of each epoch


def _atomic_save(obj: dict, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class RunDir:
    """Owns OUT/: refuses to clobber an earlier run unless told (--resume or --overwrite)."""

    def __init__(self, path: str, resume: bool, overwrite: bool, writer: bool = True) -> None:
        """`writer` is False on non-zero ranks: they read `last` to resume but write nothing."""
        self.writer = writer
        if resume and overwrite:
            raise KDCacheError("--resume and --overwrite contradict each other: pass one of them")
        self.path, self.resume = path, resume
        self.last, self.best = os.path.join(path, "last.pt"), os.path.join(path, "best.pt")
        self.log_path = os.path.join(path, "log.csv")
        self.rows: list[dict] = []
        if os.path.exists(path) and not os.path.isdir(path):
            raise KDCacheError(f"--out {path} is a file, not a run directory: choose another --out")
        if not writer:
            return
        if os.path.exists(self.last) and not resume:
            if not overwrite:
                raise KDCacheError(f"{path} already holds a training run: pass --resume to continue it, "
                                   "--overwrite to replace it, or choose another --out")
            shutil.rmtree(path)
        if resume and not os.path.exists(self.last):
            raise KDCacheError(f"nothing to resume in {path} (no last.pt): drop --resume to start a new run")
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, ".kdtrain-write-test")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            raise KDCacheError(f"cannot write the run directory {path} ({e.strerror or e}): choose an --out in a "
                               "folder you can write") from None

    def restore(self, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: object,
                scaler: torch.amp.GradScaler, meta: dict, extra: torch.nn.Module | None = None) -> tuple[int, float]:
        """Load `last` when resuming the same run; returns (first epoch to run, best top-1 so far)."""
        if not self.resume:
            return 0, -1.0
        try:
            ck = torch.load(self.last, map_location="cpu", weights_only=True)
            for key in RESUME_KEYS:
                if ck.get(key) != meta[key]:
                    raise KDCacheError(f"cannot resume {self.path}: it was trained with {key} {ck.get(key)!r}, this "
                                       f"command has {meta[key]!r}; rerun the original command with --resume, or "
                                       "start a new run (--overwrite or another --out)")
            model.load_state_dict(ck["model"])
            if extra is not None:
                extra.load_state_dict(ck["extra"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            scaler.load_state_dict(ck["scaler"])
        except KDCacheError:
            raise
        except Exception as e:  # a damaged or hostile file: torch raises many types; no code runs
            raise KDCacheError(f"cannot resume from {self.last} ({type(e).__name__}): it is not a kdtrain "
                               "checkpoint of this run; start a new run with --overwrite") from None
        with open(self.log_path, newline="") as f:
            self.rows = [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(f)][: ck["epoch"]]
        return int(ck["epoch"]), float(ck["best_top1"])

    def end_epoch(self, row: dict, ev: dict, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: object,
                  scaler: torch.amp.GradScaler, meta: dict, best: float, plots: bool,
                  extra: torch.nn.Module | None = None) -> float:
        """Log the epoch, save `last` (and `best` when top-1 improved), redraw plots; returns the best top-1.

        `extra` (e.g. a hint regressor) is training state saved in `last` only: `best` stays the student alone."""
        self.rows.append(row)
        if not self.writer:
            return max(best, row["test_top1"])
        with open(self.log_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS, lineterminator="\n", extrasaction="ignore")
            w.writeheader()
            w.writerows(self.rows)
        state = {"model": model.state_dict(), "arch": meta["student"], "arch_args": meta["student_args"],
                 "num_classes": meta["num_classes"], "image_size": meta["image_size"], "epoch": row["epoch"],
                 "test_top1": row["test_top1"], **{k: meta[k] for k in RESUME_KEYS}}
        if row["test_top1"] > best:
            best = row["test_top1"]
            _atomic_save(state, self.best)
        _atomic_save(state | {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                              "scaler": scaler.state_dict(), "best_top1": best,
                              **({"extra": extra.state_dict()} if extra is not None else {})}, self.last)
        if plots:
            from kdcache.train.plots import plot_curves, plot_reliability

            plot_curves(self.rows, os.path.join(self.path, "curves.png"))
            if ev.get("reliability"):
                plot_reliability(ev["reliability"], os.path.join(self.path, "reliability.png"),
                                 f"{meta['student']} epoch {row['epoch']}")
        return best

    def finish(self, meta: dict, config: dict, wall_seconds: float) -> dict:
        """Write metrics.json: the last epoch, the best epoch, the whole history and the config."""
        if not self.rows:
            raise KDCacheError(f"{self.path}: no epoch was run (is --epochs already reached?)")
        best = max(self.rows, key=lambda r: r["test_top1"])
        result = {**meta, "final": self.rows[-1], "best": best, "history": self.rows,
                  "wall_seconds": wall_seconds, "config": config}
        if not self.writer:
            return result
        with open(os.path.join(self.path, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2, default=str)
        return result


def _num(v: str) -> float | int | None:
    if v in ("", "None"):
        return None
    f = float(v)
    return int(f) if f.is_integer() and "." not in v else f
