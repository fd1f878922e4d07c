"""Shared helpers for the experiments: seeds, mean ± std, Markdown tables, result files, dataset halves.

Every experiment script is run from the repository root as a module, e.g.

    .venv/bin/python -m experiments.hinton

so that the dataset factories below are importable as ``experiments.common:digits_a`` (kdtrain reopens the
dataset a cache records by its spec).  Scripts write

* ``experiments/results/<name>.json`` -- every number, per seed, plus the configuration and wall time;
* ``experiments/results/<name>.md``   -- the Markdown table(s) pasted into docs/EXPERIMENTS.md;
* ``docs/img/<name>*.png``            -- plots (matplotlib Agg);
* scratch runs and caches under ``experiments/results/_work/<name>/`` (git-ignored, safe to delete).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kdcache.io import open_cache
from kdcache.config import DumpConfig
from kdcache.ops.dump import run_dump
from kdcache.ops.info import summary
from kdcache.data.datasets import ArrayDataset, DatasetInfo, open_dataset
from kdcache.models import build_model
from kdcache.config import LossConfig, TrainConfig
from kdcache.train.losses import SoftTarget
from kdcache.train.recipe import Targets, run_train
from kdcache.train.objective import Objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
IMG = os.path.join(ROOT, "docs", "img")

# --------------------------------------------------------------------------- process setup


def setup(name: str, description: str, default_seeds: int = 3, argv: Sequence[str] | None = None,
          settings: Sequence[str] | None = None) -> Exp:
    """Parse the common flags, pin torch to few threads (the machine is shared) and return the experiment.

    `settings`: optional variants of the experiment (the first is the default); a run of variant V other than the
    default writes its results as NAME_V.
    """
    p = argparse.ArgumentParser(description=description)
    if settings:
        p.add_argument("--setting", choices=list(settings), default=settings[0], help="variant [%(default)s]")
    p.add_argument("--seeds", type=int, default=default_seeds, help="seeds per configuration [%(default)s]")
    p.add_argument("--threads", type=int, default=int(os.environ.get("KD_THREADS", "1")),
                   help="torch intra-op threads [%(default)s; env KD_THREADS]")
    p.add_argument("--keep-work", action="store_true", help="keep runs and caches under results/_work/")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    setting = getattr(args, "setting", None)
    script = name
    if settings and setting != settings[0]:
        name = f"{name}_{setting}"
    return Exp(name, args.seeds, args.keep_work, list(sys.argv), setting, script)


@dataclass
class Exp:
    """One experiment's bookkeeping: its scratch directory, timer and results."""

    name: str
    n_seeds: int
    keep_work: bool
    argv: list[str]
    setting: str | None = None
    script: str = ""
    t0: float = field(default_factory=time.perf_counter)
    data: dict = field(default_factory=dict)
    tables: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.work = os.path.join(RESULTS, "_work", self.name)
        if os.path.isdir(self.work):
            shutil.rmtree(self.work)
        os.makedirs(self.work, exist_ok=True)
        os.makedirs(IMG, exist_ok=True)

    @property
    def seeds(self) -> list[int]:
        return list(range(self.n_seeds))

    def path(self, *parts: str) -> str:
        return os.path.join(self.work, *parts)

    def log(self, msg: str) -> None:
        print(f"[{self.name} {time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)

    # ----------------------------------------------------------------------- training and dumping

    def train(self, run: str, seed: int = 0, objective: Objective | LossConfig | None = None, targets=None,
              **kw) -> dict:
        """kdtrain (as a library call) with the experiments' defaults: batch 64, quiet, no plots.

        `objective`: an Objective or a LossConfig (TrainConfig's `loss`); `targets`: run_train's soft-target hook
        (kdcache.train.recipe.Targets) in place of caches; other keywords are TrainConfig fields (e.g. seq_len,
        dataset, student_args)."""
        kw.setdefault("batch_size", 64)
        if objective is not None:
            kw["loss"] = getattr(objective, "cfg", objective)
        cfg = TrainConfig(out=self.path("runs", run), seed=seed, overwrite=True, progress=False, plots=False,
                          command=f"experiments/{self.name} ({run})", **kw)
        return run_train(cfg, targets)

    def dump(self, name: str, weights_run: str, teacher: str, **kw) -> str:
        """kdcache dump of the last-epoch checkpoint of `weights_run`; returns the cache path."""
        out = self.path("caches", f"{name}.zarr")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        run_dump(DumpConfig(teacher=teacher, weights=self.checkpoint(weights_run), out=out, overwrite=True,
                            progress=False, command=f"experiments/{self.name} (dump {name})", **kw))
        return out

    def checkpoint(self, run: str, which: str = "last") -> str:
        return self.path("runs", run, f"{which}.pt")

    def load(self, run: str, which: str = "last") -> tuple[torch.nn.Module, int]:
        """Rebuild a trained model from its kdtrain checkpoint; returns (model in eval mode, image size)."""
        ck = torch.load(self.checkpoint(run, which), map_location="cpu", weights_only=True)
        args = dict(ck["arch_args"])
        tokens = ck["model"].get("tokens")
        if tokens is not None and tokens.shape[1] > 1:  # kdtrain does not record distill_tokens in arch_args
            args["distill_tokens"] = int(tokens.shape[1]) - 1
        size = int(ck["image_size"])
        model = build_model(ck["arch"], num_classes=ck["num_classes"], input_shape=(3, size, size), **args)
        model.load_state_dict(ck["model"])
        return model.eval(), int(ck["image_size"])

    # ----------------------------------------------------------------------- results

    def table(self, title: str, markdown: str) -> None:
        self.tables.append((title, markdown))
        print(f"\n### {title}\n\n{markdown}\n", flush=True)

    def finish(self) -> float:
        """Write results/<name>.json and results/<name>.md; remove the scratch dir unless --keep-work."""
        wall = time.perf_counter() - self.t0
        os.makedirs(RESULTS, exist_ok=True)
        payload = {"experiment": self.name, "setting": self.setting, "command": " ".join(self.argv),
                   "seeds": self.seeds,
                   "torch_threads": torch.get_num_threads(), "wall_seconds": round(wall, 1),
                   "torch": torch.__version__, "data": self.data}
        with open(os.path.join(RESULTS, f"{self.name}.json"), "w") as f:
            json.dump(payload, f, indent=1, default=_json_default)
        with open(os.path.join(RESULTS, f"{self.name}.md"), "w") as f:
            run = f"experiments/{self.script or self.name}.py"
            if self.script and self.name != self.script:
                run += f" --setting {self.setting}"
            f.write(f"<!-- written by {run}; wall {wall:.0f} s, "
                    f"{len(self.seeds)} seed(s), {torch.get_num_threads()} torch thread(s) -->\n")
            f.writelines(f"\n**{title}**\n\n{md}\n" for title, md in self.tables)
        if not self.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        self.log(f"done in {wall:.0f} s; wrote experiments/results/{self.name}.json and .md")
        return wall


def _json_default(o: object) -> object:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


# --------------------------------------------------------------------------- statistics and tables


def mean_std(xs: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    a = np.asarray(list(xs), dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def pm(xs: Iterable[float], scale: float = 100.0, digits: int = 1) -> str:
    """'mean ± std' of values times `scale` (percent by default)."""
    xs = list(xs)
    m, s = mean_std(xs)
    if len(xs) == 1:
        return f"{scale * m:.{digits}f}"
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A Markdown table; `align` is one char per column ('l' or 'r'), default first left, rest right."""
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def paired_t(a: Sequence[float], b: Sequence[float], level: float = 0.90) -> tuple[float, float, float, int]:
    """Per-seed differences a - b: (mean, low, high, seeds with a > b), a two-sided `level` t-interval on the mean."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    m, s = mean_std(d)
    if len(d) < 2:
        return m, float("nan"), float("nan"), int((d > 0).sum())
    try:
        from scipy.stats import t

        q = float(t.ppf(0.5 + level / 2, len(d) - 1))
    except ImportError:  # scipy is not a dependency: the 90 % quantiles for 1..9 degrees of freedom
        if level != 0.90 or len(d) > 10:
            raise
        q = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833)[len(d) - 2]
    half = q * s / math.sqrt(len(d))
    return m, m - half, m + half, int((d > 0).sum())


def paired_diff(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, int]:
    """Mean and std of per-seed differences a - b, and how many seeds have a > b."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    m, s = mean_std(d)
    return m, s, int((d > 0).sum())


# --------------------------------------------------------------------------- datasets

HALF_SEED = 1234


def _half_indices(labels: np.ndarray, which: str) -> np.ndarray:
    """A deterministic class-stratified half of the digits train split ('a' or 'b'), in original order."""
    rng = np.random.RandomState(HALF_SEED)
    a = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        a.append(rng.permutation(idx)[: len(idx) // 2])
    a = np.sort(np.concatenate(a))
    if which == "a":
        return a
    mask = np.ones(len(labels), dtype=bool)
    mask[a] = False
    return np.flatnonzero(mask)


def _digits_half(which: str, split: str) -> ArrayDataset:
    base = open_dataset("digits", split)
    spec = f"experiments.common:digits_{which}"
    if split == "test":  # the test split is digits' own, whole
        return ArrayDataset(DatasetInfo(spec, split, base.info.num_classes, base.info.class_names,
                                        base.info.base_shape), base.images, base.labels, base.layout)
    idx = _half_indices(base.labels, which)
    info = DatasetInfo(spec, split, base.info.num_classes, base.info.class_names, base.info.base_shape)
    return ArrayDataset(info, np.ascontiguousarray(base.images[idx]), base.labels[idx], base.layout)


def digits_a(split: str = "train", root: str | None = None) -> ArrayDataset:
    """Half A of the digits train split (716 images: floor of half of each class); test = the digits test split."""
    return _digits_half("a", split)


def digits_b(split: str = "train", root: str | None = None) -> ArrayDataset:
    """Half B: the other 721 train images; test = the digits test split."""
    return _digits_half("b", split)


OMITTED_CLASS = 3


def digits_no3(split: str = "train", root: str | None = None) -> ArrayDataset:
    """The digits train split without any image of a 3 (Hinton et al.'s omitted-class transfer set);
    test = the whole digits test split, 3s included.  Still a 10-class dataset."""
    base = open_dataset("digits", split)
    spec = "experiments.common:digits_no3"
    keep = np.arange(len(base.labels)) if split == "test" else np.flatnonzero(base.labels != OMITTED_CLASS)
    info = DatasetInfo(spec, split, base.info.num_classes, base.info.class_names, base.info.base_shape)
    return ArrayDataset(info, np.ascontiguousarray(base.images[keep]), base.labels[keep], base.layout)


# --------------------------------------------------------------------------- cache facts


def cache_facts(path: str) -> dict:
    """Teacher top-1 on the cached views, mean entropy (nats) and bytes per sample, from `kdcache info`."""
    with open_cache(path) as c:
        s = summary(c)
    return {k: s[k] for k in ("teacher_top1", "mean_entropy", "topk_mass", "bytes_on_disk", "bytes_per_sample",
                              "decoded_bytes", "n", "n_views", "kind", "k")}


def savefig(fig, name: str) -> str:
    path = os.path.join(IMG, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return os.path.relpath(path, ROOT)


# --------------------------------------------------------------------------- evaluation


def test_logits(model: torch.nn.Module, image_size: int, spec: str = "digits",
                views: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of `model` on the test split, each sample under `views[i]` (identity if None)."""
    from kdcache.data.render import Preprocess
    from kdcache.train.eval import predict

    ds = open_dataset(spec, "test")
    v = None if views is None else np.asarray(views, dtype=np.float32).reshape(len(ds), 5)
    return predict(model, ds, Preprocess(image_size), torch.device("cpu"), views=v), torch.from_numpy(ds.labels)


def scores(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """top1, ECE (15 bins) and NLL of logits against labels."""
    from kdcache.train import metrics

    return {"top1": metrics.accuracy(logits, y), "ece": metrics.ece(logits.softmax(-1), y),
            "nll": float(torch.nn.functional.cross_entropy(logits, y))}


def head_logits(model: torch.nn.Module, image_size: int, spec: str = "digits") -> tuple[torch.Tensor, torch.Tensor]:
    """(heads (N, H, C), labels) on the test split: every head of a ViT/Mixer with distillation tokens (H = 1 for
    other models)."""
    from kdcache.data.render import Preprocess, render
    from kdcache.data.views import identity_views
    from kdcache.models import has_distill_heads

    ds = open_dataset(spec, "test")
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    x = render(images, torch.from_numpy(identity_views(len(ds))[:, 0]), Preprocess(image_size))
    model.eval()
    with torch.inference_mode():
        heads = model.forward_heads(x) if has_distill_heads(model) else model(x)[:, None]
    return heads, torch.from_numpy(ds.labels)


def head_scores(model: torch.nn.Module, image_size: int, spec: str = "digits") -> dict:
    """Per-head test scores of a ViT/Mixer with distillation tokens: 'cls', 'dist1', … and 'mean' (of logits),
    the inference DeiT uses; a model without tokens gives just 'cls'."""
    heads, y = head_logits(model, image_size, spec)
    out = {"cls": scores(heads[:, 0], y)}
    for i in range(1, heads.shape[1]):
        out[f"dist{i}"] = scores(heads[:, i], y)
    if heads.shape[1] > 1:
        out["mean"] = scores(heads.mean(dim=1), y)
    return out


class OnlineTeacher(Targets):
    """Soft targets from a teacher run on the very input the student sees (no cache), through run_train's Targets
    hook; `post` maps its fp32 logits (e.g. to float16 as a cache stores them, or to one-hot hard labels)."""

    def __init__(self, model: torch.nn.Module, post: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__(1)
        self.model, self.post = model.eval(), post

    def __call__(self, batch: object, x: torch.Tensor) -> list[SoftTarget]:
        with torch.no_grad():
            z = self.model(x).float()
        return [SoftTarget(logits=z if self.post is None else self.post(z), num_classes=z.shape[-1])]
