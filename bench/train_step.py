"""Training-step throughput in one process: plain CE vs KD from a cache vs online KD (teacher in the loop).

Every mode trains with kdtrain's own step, kdcache.train.recipe.Trainer.step (model input -> student ->
objective -> backward -> grad clip 1.0 -> optimiser and schedule step), built as run_train builds it:
build_optimizer (AdamW, warmup + cosine), Objective(LossConfig().resolve(n_teachers)), HeadsView(student),
and the same loader, kdcache.train.batches.PairedLoader over digits train (1,437 images rendered at 32 px,
batch 128). Only the recipe's `targets` hook differs:
  plain    no cache, Targets(0): Objective resolves to CE
  cached   the teacher's cache (full logits, loaded in memory as kdtrain does when it fits --cache-ram),
           Targets(1) (the default hook: the batch's cached targets): KD, alpha 0.5, T 4
  online   no cache; OnlineTeacher, a Targets subclass that runs the teacher on the step's own model input
           under no_grad and returns its logits as the SoftTarget: the same KD loss
Students: mlp (kdcache's default 3072-1200-1200-10) and vit_nano. Teachers: cnn_s and cifar_resnet10 at
width 16 (bench.synthdata.TEACHERS), random weights (speed only); caches via kdcache's run_dump.
Modes are interleaved step by step (round robin: one training step of each mode in turn, after one
untimed warm-up epoch each), so load from other jobs on this shared machine hits every mode alike; rounds
during which other processes used more than 10% of the machine are dropped when at least a quarter (and 8)
of the rounds stay (else all are kept and the row says "contended"). Each
step's time covers fetching the batch from the loader (images + cache targets; the per-epoch DataLoader
start included) and the whole step. Reported: samples/s over all timed steps, and at the median step time
of full batches (robust to bursts of contention), and the ratio of process CPU time per sample (all
threads), which other jobs' load distorts far less than wall time.
Because a 3% target is below what a loaded machine resolves, what KD from a cache adds per step is also
measured in isolation (best-of timing): Cache.read + to_target of one batch, and the KD loss minus the CE
loss (forward + backward); "predicted x plain" = 1 / (1 + overhead / fastest plain step), a conservative
bound (the fastest step makes the overhead look largest).

Target: cached >= 0.97x plain samples/s. Also reported: online / cached.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.synthdata import TEACHERS, load_teacher, random_teacher  # noqa: E402
from kdcache.train.losses import SoftTarget  # noqa: E402
from kdcache.train.recipe import Targets  # noqa: E402

IMAGE_SIZE = 32
BATCH = 128


def dump_caches(wd: Path) -> dict[str, tuple[str, str]]:
    """short teacher name -> (its cache of digits train, its random weights)."""
    from kdcache.config import DumpConfig
    from kdcache.ops.dump import run_dump

    out = {}
    for short in TEACHERS:
        name, w = random_teacher(short, IMAGE_SIZE, wd)
        out[short] = (run_dump(DumpConfig(teacher=name, weights=w, dataset="digits", out=str(wd / f"{short}.zarr"),
                                          overwrite=True, progress=False, batch_size=256)), w)
    return out


class OnlineTeacher(Targets):
    """Online KD through the recipe's targets hook: the teacher's logits on the step's own model input."""

    def __init__(self, teacher: torch.nn.Module, num_classes: int) -> None:
        super().__init__(n_teachers=1)
        self.teacher, self.num_classes = teacher, num_classes

    def __call__(self, batch, x: torch.Tensor) -> list[SoftTarget]:
        with torch.no_grad():
            return [SoftTarget(logits=self.teacher(x).float(), num_classes=self.num_classes)]


class Mode:
    """One training setup: its own student, optimiser and loader, and kdtrain's Trainer with a targets hook."""

    def __init__(self, label: str, student: str, ds, caches: list, targets: Targets, epochs_total: int) -> None:
        from kdcache.config import TrainConfig
        from kdcache.data.render import model_input
        from kdcache.device import amp_dtype
        from kdcache.models import HeadsView, build_model
        from kdcache.train.batches import PairedLoader
        from kdcache.train.objective import Objective
        from kdcache.train.recipe import Trainer, build_optimizer

        self.label = label
        cpu = torch.device("cpu")
        torch.manual_seed(0)
        cfg = TrainConfig(student=student, epochs=epochs_total, batch_size=BATCH)  # kdtrain's defaults otherwise
        pre = model_input(ds.info, IMAGE_SIZE)
        model = build_model(student, num_classes=ds.info.num_classes, input_shape=pre.input_shape)
        self.loader = PairedLoader(ds, caches, cfg.batch_size, seed=cfg.seed)
        opt, sched = build_optimizer(cfg, model, epochs_total * len(self.loader))
        self.trainer = Trainer(HeadsView(model), Objective(cfg.loss.resolve(targets.n_teachers)), opt, sched,
                               torch.amp.GradScaler(enabled=amp_dtype(cpu) == torch.float16), pre, cpu, cfg.clip,
                               torch.Generator().manual_seed(cfg.seed), targets)
        self.epoch_no = 0

    def steps(self):
        """Endless training steps over successive epochs; yields (samples, seconds, CPU seconds) per step, the
        times covering the loader's next batch (images + cache targets) and the whole Trainer.step."""
        self.trainer.net.train()
        while True:
            loss_sum = torch.zeros(())
            it = iter(self.loader.epoch(self.epoch_no))
            while True:
                t0, c0 = time.perf_counter(), time.process_time()
                batch = next(it, None)
                if batch is None:
                    break
                n = len(batch.labels)
                loss_sum += self.trainer.step(batch) * n  # no sync per step, as Trainer.train_epoch
                yield n, time.perf_counter() - t0, time.process_time() - c0
            float(loss_sum)
            self.epoch_no += 1


def _min_time(fn, reps: int = 300, inner: int = 5) -> float:
    """Best per-call seconds of `fn` over `reps` groups of `inner` calls (robust to other jobs' load)."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def kd_overhead(caches: dict, ds) -> list[dict]:
    """What KD from a cache adds to a step, measured in isolation: the cache read + conversion of one batch
    of targets (Cache.read + to_target) and KD loss forward+backward minus CE loss forward+backward, on
    (128, 10) student logits. Best-of timing, so it is robust to load from other jobs."""
    from kdcache.config import LossConfig
    from kdcache.train.batches import to_target
    from kdcache.train.objective import Objective

    rng = np.random.default_rng(0)
    idx = rng.permutation(len(ds))[:BATCH]
    y = torch.from_numpy(ds.labels[idx])
    logits = torch.randn(BATCH, 10, requires_grad=True)
    ce, kd = Objective(LossConfig("ce").resolve(0)), Objective(LossConfig("kd").resolve(1))
    cpu = torch.device("cpu")
    out = []
    for short, cache in caches.items():
        targets = [to_target(cache.read(idx), 10, cpu)]

        def read(cache=cache) -> None:
            to_target(cache.read(idx), 10, cpu)

        def loss_ce() -> None:
            ce(logits[:, None], y, [], None).backward()

        def loss_kd(targets=targets) -> None:
            kd(logits[:, None], y, targets, None).backward()

        t_read, t_ce, t_kd = _min_time(read), _min_time(loss_ce), _min_time(loss_kd)
        out.append({"teacher cache": short, "read+to_target us": 1e6 * t_read, "CE loss fwd+bwd us": 1e6 * t_ce,
                    "KD loss fwd+bwd us": 1e6 * t_kd, "KD overhead us/step": 1e6 * (t_read + t_kd - t_ce)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", default="mlp,vit_nano")
    ap.add_argument("--epochs", default="mlp=16,vit_nano=2", help="timed epochs per mode, per student")
    args = ap.parse_args()
    common.setup_torch()
    from kdcache.data.datasets import open_dataset
    from kdcache.io import open_cache

    wd = common.workdir("train_step")
    dumped = dump_caches(wd)
    ds = open_dataset("digits", "train")
    caches, teachers = {}, {}
    for short, (path, weights) in dumped.items():
        c = open_cache(path)
        c.load()  # kdtrain loads a cache that fits --cache-ram (default 1 GiB)
        caches[short] = c
        teachers[short] = load_teacher(short, weights, IMAGE_SIZE)
    epochs = {k: int(v) for k, v in (kv.split("=") for kv in args.epochs.split(","))}

    overhead = kd_overhead(caches, ds)
    print(common.table(overhead), flush=True)
    over_us = max(o["KD overhead us/step"] for o in overhead)
    rows = []
    for student in args.students.split(","):
        e = epochs.get(student, 4)
        modes = [Mode("plain CE", student, ds, [], Targets(0), e + 1)]
        modes += [Mode(f"KD cached ({t})", student, ds, [caches[t]], Targets(1), e + 1) for t in TEACHERS]
        modes += [Mode(f"KD online ({t})", student, ds, [], OnlineTeacher(teachers[t], ds.info.num_classes), e + 1)
                  for t in TEACHERS]
        per_epoch = len(modes[0].loader)
        gens = [m.steps() for m in modes]
        for _ in range(per_epoch):  # warm-up epoch, not timed
            for g in gens:
                next(g)
        steps: dict[str, list[tuple[int, float, float]]] = {m.label: [] for m in modes}
        load0 = common.loadavg()
        common.quiet_gate()
        round_other = []
        with common.Contention() as cont:
            for _ in range(e * per_epoch):  # round robin, one step of each mode at a time
                with common.Contention() as rc:
                    for m, g in zip(modes, gens):
                        steps[m.label].append(next(g))
                round_other.append(rc.other)
        # keep the rounds during which other jobs left the machine (nearly) alone, if there are enough
        keep, clean = common.quiet_indices(round_other, min_keep=max(8, len(round_other) // 4))
        steps = {k: [v[i] for i in keep] for k, v in steps.items()}
        mean, med, cpu, fastest = {}, {}, {}, {}
        for label, st in steps.items():
            n = np.array([a for a, _, _ in st], dtype=np.float64)
            dt = np.array([b for _, b, _ in st])
            ct = np.array([c for _, _, c in st])
            mean[label] = n.sum() / dt.sum()
            med[label] = BATCH / float(np.median(dt[n == BATCH]))
            fastest[label] = float(dt[n == BATCH].min())
            cpu[label] = n.sum() / ct.sum()  # samples per CPU-second (all threads)
        for m in modes:
            teacher = m.label.split("(")[-1].rstrip(")") if "(" in m.label else None
            online = m.label.startswith("KD online")
            c = f"KD cached ({teacher})"
            rows.append({"student": student, "mode": m.label, "samples/s": mean[m.label],
                         "median-step samples/s": med[m.label],
                         "x plain": mean[m.label] / mean["plain CE"],
                         "x plain (median step)": med[m.label] / med["plain CE"],
                         "x plain (CPU time)": cpu[m.label] / cpu["plain CE"],
                         "online/cached": mean[m.label] / mean[c] if online else None,
                         "online/cached (median step)": med[m.label] / med[c] if online else None,
                         "online/cached (CPU time)": cpu[m.label] / cpu[c] if online else None,
                         "predicted x plain": 1 / (1 + over_us * 1e-6 / fastest["plain CE"])
                         if m.label.startswith("KD cached") else None,
                         "steps": f"{len(steps[m.label])}/{len(round_other)}" + ("" if clean else " (contended)"),
                         "other CPU %": 100 * (max(round_other[i] for i in keep) if clean else cont.other),
                         "loadavg": load0,
                         "loadavg_end": common.loadavg()})
            print(f"  {student:9s} {m.label:34s} {mean[m.label]:>9,.0f} samples/s (median step {med[m.label]:,.0f})  "
                  f"x plain {mean[m.label] / mean['plain CE']:.3f} ({med[m.label] / med['plain CE']:.3f})", flush=True)
    cols = ["student", "mode", "samples/s", "median-step samples/s", "x plain", "x plain (median step)",
            "x plain (CPU time)", "predicted x plain", "online/cached", "online/cached (median step)",
            "online/cached (CPU time)", "steps", "other CPU %"]
    print()
    print(common.table(rows, cols))
    verdict = [{"student": r["student"], "mode": r["mode"], "x_plain": r["x plain"],
                "x_plain_median_step": r["x plain (median step)"], "x_plain_cpu_time": r["x plain (CPU time)"],
                "predicted_x_plain": r["predicted x plain"], "met": bool(r["x plain (median step)"] >= 0.97)}
               for r in rows if r["mode"].startswith("KD cached")]
    print("\ntarget cached >= 0.97x plain (median step): " + ", ".join(
        f"{v['student']} {v['mode']}: {v['x_plain_median_step']:.3f} ({'met' if v['met'] else 'MISSED'}; predicted "
        f"from the measured overhead {v['predicted_x_plain']:.4f})" for v in verdict))
    common.write_results("train_step", {"rows": rows, "target": verdict, "kd_overhead": overhead, "batch": BATCH, "image_size": IMAGE_SIZE,
                                        "dataset": f"digits train ({len(ds)} images)"})
    for c in caches.values():
        c.close()


if __name__ == "__main__":
    main()
