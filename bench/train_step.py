"""Training-step throughput in one process: plain CE vs KD from a cache vs online KD (teacher in the loop).

Same student, same loader (kdcache.train.data.PairedLoader over digits train, 1,437 images rendered at
32 px, batch 128), same optimiser (kdtrain's AdamW + warmup/cosine schedule, grad clip 1.0), same step as
kdcache/train/loop.py:
  plain    PairedLoader without a cache, Objective('ce')
  cached   PairedLoader with the teacher's cache (full logits, loaded in memory as kdtrain does when it
           fits --cache-ram), Objective('kd') = losses.kd(alpha 0.5, T 4)
  online   PairedLoader without a cache; the teacher runs on the same rendered batch under no_grad and
           losses.kd is applied to its logits (the loop is written here from kdcache pieces)
Students: mlp (kdcache's default 3072-1200-1200-10) and vit_nano. Teachers: cnn_s and cifar_resnet10 at
width 16 (bench.synthdata:cifar_resnet10_w16), random weights (speed only); caches via kdcache's run_dump.
Epochs of all modes are interleaved (round robin) so machine noise hits every mode alike; the median and
the best epoch (least disturbed by other jobs on the machine) are both reported.

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

TEACHERS = {"cnn_s": "cnn_s", "cifar_resnet10_w16": "bench.synthdata:cifar_resnet10_w16"}
IMAGE_SIZE = 32
BATCH = 128


def dump_caches(wd: Path) -> dict[str, str]:
    from kdcache.cache.dump import DumpConfig, run_dump
    from kdcache.models import build_model

    out = {}
    for short, name in TEACHERS.items():
        torch.manual_seed(0)
        w = wd / f"{short}_random.pt"
        torch.save(build_model(name, num_classes=10, image_size=IMAGE_SIZE).state_dict(), w)
        out[short] = run_dump(DumpConfig(teacher=name, weights=str(w), dataset="digits", out=str(wd / f"{short}.zarr"),
                                         overwrite=True, progress=False, batch_size=256))
    return out


class Mode:
    """One training setup: its own student, optimiser, loader and (online) teacher."""

    def __init__(self, label: str, student: str, ds, caches: list, teacher: torch.nn.Module | None,
                 epochs_total: int) -> None:
        from kdcache.models import build_model
        from kdcache.train.data import PairedLoader
        from kdcache.train.loop import TrainConfig, _optimizer
        from kdcache.train.objective import Objective

        self.label, self.teacher = label, teacher
        torch.manual_seed(0)
        self.model = build_model(student, num_classes=10, image_size=IMAGE_SIZE)
        self.loader = PairedLoader(ds, caches, BATCH, seed=0)
        self.objective = Objective("kd" if caches else "ce").resolve(len(caches))
        self.kd = Objective("kd").resolve(1)
        cfg = TrainConfig(epochs=epochs_total)
        self.opt, self.sched = _optimizer(cfg, self.model, epochs_total * len(self.loader))
        self.gen = torch.Generator().manual_seed(0)
        self.epoch_no = 0

    def epoch(self) -> tuple[int, float]:
        from kdcache.data.views import Preprocess, render
        from kdcache.train import losses

        pre = Preprocess(IMAGE_SIZE)
        self.model.train()
        seen, loss_sum = 0, 0.0
        t0 = time.perf_counter()
        for batch in self.loader.epoch(self.epoch_no):
            x = render(batch.images, batch.views, pre)
            heads = self.model(x)[:, None]
            if self.teacher is not None:  # online KD: the teacher on the same view, no graph
                with torch.no_grad():
                    t = self.teacher(x).float()
                loss = losses.kd(heads[:, 0].float(), batch.labels, losses.SoftTarget(logits=t, num_classes=10),
                                 self.kd.temperature, self.kd.alpha, self.kd.topk_mode)
            else:
                loss = self.objective(heads.float(), batch.labels, batch.targets, self.gen)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.sched.step()
            n = len(batch.labels)
            seen, loss_sum = seen + n, loss_sum + float(loss.detach()) * n
        self.epoch_no += 1
        return seen, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", default="mlp,vit_nano")
    ap.add_argument("--reps", default="mlp=15,vit_nano=5", help="timed epochs per mode, per student")
    args = ap.parse_args()
    common.setup_torch()
    from kdcache.cache import open_cache
    from kdcache.data.datasets import open_dataset
    from kdcache.models import build_model

    wd = common.workdir("train_step")
    cache_paths = dump_caches(wd)
    ds = open_dataset("digits", "train")
    caches = {}
    for short, p in cache_paths.items():
        c = open_cache(p)
        c.load()  # kdtrain loads a cache that fits --cache-ram (default 1 GiB)
        caches[short] = c
    teachers = {}
    for short, name in TEACHERS.items():
        t = build_model(name, num_classes=10, image_size=IMAGE_SIZE)
        t.load_state_dict(torch.load(wd / f"{short}_random.pt", weights_only=True))
        teachers[short] = t.eval()
    reps = {k: int(v) for k, v in (kv.split("=") for kv in args.reps.split(","))}

    rows = []
    print(f"load average {common.wait_quiet(1.0, 60):.2f}", flush=True)
    for student in args.students.split(","):
        r = reps.get(student, 5)
        modes = [Mode("plain CE", student, ds, [], None, r + 1)]
        modes += [Mode(f"KD cached ({t})", student, ds, [caches[t]], None, r + 1) for t in TEACHERS]
        modes += [Mode(f"KD online ({t})", student, ds, [], teachers[t], r + 1) for t in TEACHERS]
        for m in modes:  # warm-up epoch (first-call allocations, thread pools)
            m.epoch()
        times: dict[str, list[float]] = {m.label: [] for m in modes}
        load0 = common.loadavg()
        for _ in range(r):
            for m in modes:
                n, dt = m.epoch()
                times[m.label].append(n / dt)
        sps = {k: common.median(v) for k, v in times.items()}
        best = {k: max(v) for k, v in times.items()}
        for m in modes:
            teacher = m.label.split("(")[-1].rstrip(")") if "(" in m.label else None
            online = m.label.startswith("KD online")
            c = f"KD cached ({teacher})"
            rows.append({"student": student, "mode": m.label, "samples/s": sps[m.label], "best samples/s": best[m.label],
                         "x plain": sps[m.label] / sps["plain CE"], "x plain (best)": best[m.label] / best["plain CE"],
                         "online/cached": sps[m.label] / sps[c] if online else None,
                         "online/cached (best)": best[m.label] / best[c] if online else None,
                         "epochs": len(times[m.label]), "loadavg": load0, "loadavg_end": common.loadavg()})
            print(f"  {student:9s} {m.label:34s} {sps[m.label]:>9,.0f} samples/s (best {best[m.label]:,.0f})  "
                  f"x plain {sps[m.label] / sps['plain CE']:.3f} (best {best[m.label] / best['plain CE']:.3f})", flush=True)
    cols = ["student", "mode", "samples/s", "best samples/s", "x plain", "x plain (best)", "online/cached",
            "online/cached (best)", "epochs", "loadavg"]
    print()
    print(common.table(rows, cols))
    verdict = [{"student": r["student"], "mode": r["mode"], "x_plain": r["x plain"], "x_plain_best": r["x plain (best)"],
                "met": r["x plain"] >= 0.97}
               for r in rows if r["mode"].startswith("KD cached")]
    print("\ntarget cached >= 0.97x plain: " + ", ".join(
        f"{v['student']} {v['mode']}: {v['x_plain']:.3f} ({'met' if v['met'] else 'MISSED'})" for v in verdict))
    common.write_results("train_step", {"rows": rows, "target": verdict, "batch": BATCH, "image_size": IMAGE_SIZE,
                                        "dataset": f"digits train ({len(ds)} images)"})
    for c in caches.values():
        c.close()


if __name__ == "__main__":
    main()
