"""Decode-bound dumps: several teachers in one pass vs separate dumps, and --num-workers 0 vs 2.

Data. N JPEGs (default 3,000; the published run used 1,000; quality 90, ImageNet-like sizes: width 400-640, height
300-480, so every side is >= 256 and a JPEG's draft cannot shrink it; smooth random colour fields plus noise, ~80 KB
each), 10 classes, written once under $KDBENCH_DIR/decode/ as an image folder (`imagefolder:DIR`) and as WebDataset
tar shards of 500 samples (`wds:DIR/train-*.tar`, the same bytes). Files stay in the page cache: this measures
decoding, not the disk. kdcache decodes each to a 256-px base image (PIL: draft, RGB, shorter side to 256, centre
crop).

Teachers. Two small CNNs with random weights (speed only), saved as kdtrain saves checkpoints, so that decoding
dominates: A = cnn_s (width 16) at 32 px, B = cifar_resnet10 (width 8) at 24 px; full fp16 logits into Zarr,
batch 256, CPU. Their render + forward cost per image, and the decode cost per image, are measured apart
(`costs`) to show how decode-bound the dumps are.

Part 1 -- one pass vs separate dumps (`ratio`). (a) `kdcache.ops.dump.run_dumps([A, B])`: one pass, each image
decoded once, both teachers on it; (b) `run_dump(A)` then `run_dump(B)`: two dumps, each decoding every image.
In this process (no interpreter start-up counted for (b)'s second command: conservative). Rounds alternate (a),
(b), each started in a quiet window (bench/common.py quiet_gate); rounds during which other processes used more
than 10% of the machine are dropped when at least two clean rounds remain. Reported: median walls, their ratio
and the median of the per-round ratios, for --num-workers 0 and 2; also the ratio of CPU seconds (this process
and its workers), which other jobs on a shared machine inflate far less than wall time. Target: (a)/(b) <= 0.65.
The one-pass caches are checked equal, array for array, to the separate ones.

Part 2 -- workers (`workers`). `run_dump(A)` on the image folder and on the tar shards with --num-workers 0 and
2, alternating; samples/s (whole call: open, fingerprint, loop, finalize) and the speed-up of 2 workers.
On 2 cores the DataLoader's two worker processes share them with the main process's inference.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import common  # noqa: E402

TEACHERS = {"A": ("cnn_s", {"width": 16}, 32), "B": ("cifar_resnet10", {"width": 8}, 24)}
CLASSES = 10
SHARD = 500
BATCH = 256


# --------------------------------------------------------------------------- data
def _jpeg(rng: np.random.Generator) -> bytes:
    from PIL import Image

    w, h = int(rng.integers(400, 641)), int(rng.integers(300, 481))
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.int16)
    img = img + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_data(root: Path, n: int) -> tuple[str, str, dict]:
    """The image folder and tar shards (made once per N; a marker records what made them)."""
    marker = root / "data.json"
    want = {"n": n, "classes": CLASSES, "shard": SHARD, "version": 1}
    if marker.exists() and json.loads(marker.read_text()).get("params") == want:
        return str(root / "images"), str(root / "shards"), json.loads(marker.read_text())
    shutil.rmtree(root / "images", ignore_errors=True)
    shutil.rmtree(root / "shards", ignore_errors=True)
    (root / "shards").mkdir(parents=True)
    rng = np.random.default_rng(0)
    t0, total = time.perf_counter(), 0
    tar = None
    for i in range(n):
        data, label = _jpeg(rng), i % CLASSES
        total += len(data)
        folder = root / "images" / "train" / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(data)
        if i % SHARD == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(root / "shards" / f"train-{i // SHARD:06d}.tar", "w")
        for name, payload in ((f"{i:06d}.jpg", data), (f"{i:06d}.cls", str(label).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    if tar is not None:
        tar.close()
    meta = {"params": want, "mean_jpeg_kb": round(total / n / 1024, 1), "made_s": round(time.perf_counter() - t0, 1)}
    marker.write_text(json.dumps(meta))
    return str(root / "images"), str(root / "shards"), meta


def save_teachers(root: Path) -> dict[str, str]:
    from kdcache.models import build_model

    paths = {}
    for key, (name, args, size) in TEACHERS.items():
        torch.manual_seed(0)
        model = build_model(name, num_classes=CLASSES, input_shape=(3, size, size), **args)
        paths[key] = str(root / f"teacher_{key}.pt")
        torch.save({"model": model.state_dict(), "arch_args": args}, paths[key])
    return paths


def config(key: str, weights: dict[str, str], spec: str, out: Path, workers: int):
    from kdcache.config import DumpConfig

    name, _, size = TEACHERS[key]
    return DumpConfig(teacher=name, weights=weights[key], dataset=spec, out=str(out), image_size=size,
                      batch_size=BATCH, num_workers=workers, device="cpu", overwrite=True, progress=False)


# --------------------------------------------------------------------------- measurements
def costs(spec: str, weights: dict[str, str], n_probe: int = 256) -> dict:
    """ms per image: decoding (the dataset's __getitem__), and each teacher's render + forward on a batch."""
    from kdcache.data.datasets import open_dataset
    from kdcache.data.render import model_input
    from kdcache.models import build_model, checkpoint_arch_args, load_weights

    ds = open_dataset(spec)
    idx = np.linspace(0, len(ds) - 1, min(n_probe, len(ds))).astype(int)
    common.quiet_gate()
    with common.Contention() as c:
        t0 = time.perf_counter()
        x = torch.stack([ds[int(i)][0] for i in idx])
        decode = (time.perf_counter() - t0) / len(idx) * 1000
    out = {"decode ms/img": decode, "other CPU % (decode)": 100 * c.other}
    views = torch.tensor([0, 0, 1, 1, 0.0])
    for key, (name, _, size) in TEACHERS.items():
        pre = model_input(ds.info, size)
        model = build_model(name, CLASSES, pre.input_shape, **checkpoint_arch_args(weights[key]))
        load_weights(model, weights[key], name)
        model.eval()
        with torch.inference_mode():
            model(pre(x, views))  # warm-up
            t0 = time.perf_counter()
            model(pre(x, views))
        out[f"teacher {key} ms/img"] = (time.perf_counter() - t0) / len(idx) * 1000
    return out


def _same(a: str, b: str) -> bool:
    import zarr

    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    names = sorted(k for k, _ in ga.arrays())
    return names == sorted(k for k, _ in gb.arrays()) and all(
        np.array_equal(ga[k][...], gb[k][...]) for k in names)


def _cpu_s() -> float:
    """CPU seconds of this process and its waited-for children (the DataLoader's workers): unlike wall time, not
    inflated by other jobs on the machine (though their cache pressure still counts)."""
    return sum(os.times()[:4])


def ratio(spec: str, weights: dict[str, str], wd: Path, workers: int, reps: int, n: int) -> dict:
    from kdcache.ops.dump import run_dump, run_dumps

    one, sep, others, per_round, loads, cpu_one, cpu_sep = [], [], [], [], [], [], []
    for r in range(reps):
        common.quiet_gate()
        with common.Contention() as c1:
            t0, u0 = time.perf_counter(), _cpu_s()
            run_dumps([config(k, weights, spec, wd / f"one_{k}.zarr", workers) for k in TEACHERS])
            a, cpu_one_r = time.perf_counter() - t0, _cpu_s() - u0
        common.quiet_gate()
        with common.Contention() as c2:
            t0, u0 = time.perf_counter(), _cpu_s()
            for k in TEACHERS:
                run_dump(config(k, weights, spec, wd / f"sep_{k}.zarr", workers))
            b, cpu_sep_r = time.perf_counter() - t0, _cpu_s() - u0
        one.append(a)
        sep.append(b)
        cpu_one.append(cpu_one_r)
        cpu_sep.append(cpu_sep_r)
        per_round.append(a / b)
        others.append(max(c1.other, c2.other))
        loads.append(common.loadavg())
        print(f"  workers {workers} round {r + 1}: one pass {a:6.1f} s, separate {b:6.1f} s, ratio {a / b:.3f}"
              f" (others {100 * others[-1]:.0f}%, load {loads[-1]})", flush=True)
    keep, clean = common.quiet_indices(others)
    a, b = common.median([one[i] for i in keep]), common.median([sep[i] for i in keep])
    equal = all(_same(str(wd / f"one_{k}.zarr"), str(wd / f"sep_{k}.zarr")) for k in TEACHERS)
    return {"workers": workers, "N": n, "one pass s": a, "separate s": b, "one/separate": a / b,
            "median round ratio": common.median([per_round[i] for i in keep]),
            "CPU s one/separate": common.median(cpu_one) / common.median(cpu_sep),
            "CPU s one pass": common.median(cpu_one), "CPU s separate": common.median(cpu_sep),
            "one pass samples/s": n / a, "separate samples/s (per dump)": 2 * n / b,
            "caches equal": equal, "rounds used": f"{len(keep)}/{reps}" + ("" if clean else " (contended)"),
            "other CPU %": 100 * (max(others[i] for i in keep) if clean else common.median(others)),
            "other CPU % per round": [round(100 * o, 1) for o in others],
            "round ratios": [round(x, 3) for x in per_round], "load avg": f"{min(loads)}-{max(loads)}",
            "load avg per round": loads}


def workers_rows(specs: dict[str, str], weights: dict[str, str], wd: Path, reps: int, n: int) -> list[dict]:
    from kdcache.ops.dump import run_dump

    rows = []
    for label, spec in specs.items():
        walls: dict[int, list[float]] = {0: [], 2: []}
        others, loads = [], []
        for r in range(reps):
            worst = 0.0
            for w in (0, 2):
                common.quiet_gate()
                with common.Contention() as c:
                    t0 = time.perf_counter()
                    run_dump(config("A", weights, spec, wd / f"w{w}.zarr", w))
                    walls[w].append(time.perf_counter() - t0)
                worst = max(worst, c.other)
            others.append(worst)
            loads.append(common.loadavg())
            print(f"  {label:11s} round {r + 1}: 0 workers {n / walls[0][-1]:7.1f}/s, 2 workers "
                  f"{n / walls[2][-1]:7.1f}/s (others {100 * worst:.0f}%, load {loads[-1]})", flush=True)
        keep, clean = common.quiet_indices(others)
        w0, w2 = (common.median([walls[w][i] for i in keep]) for w in (0, 2))
        rows.append({"dataset": label, "N": n, "0 workers samples/s": n / w0, "2 workers samples/s": n / w2,
                     "2 workers / 0": w0 / w2, "rounds used": f"{len(keep)}/{reps}" + ("" if clean else " (contended)"),
                     "other CPU %": 100 * (max(others[i] for i in keep) if clean else common.median(others)),
                     "other CPU % per round": [round(100 * o, 1) for o in others],
                     "load avg": f"{min(loads)}-{max(loads)}", "load avg per round": loads})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="JPEGs written and dumped")
    ap.add_argument("--reps", type=int, default=3, help="rounds of each comparison")
    ap.add_argument("--ratio-workers", default="0,2", help="--num-workers values of part 1")
    ap.add_argument("--skip-workers", action="store_true", help="skip part 2")
    args = ap.parse_args()
    common.setup_torch()
    import PIL
    from PIL import features

    wd = common.workdir("decode")
    images, shards, data = make_data(wd, args.n)
    weights = save_teachers(wd)
    folder_spec, wds_spec = f"imagefolder:{images}", f"wds:{shards}/train-*.tar"
    print(f"{args.n} JPEGs, mean {data['mean_jpeg_kb']} KB; teachers {TEACHERS}", flush=True)
    from dataclasses import replace

    from kdcache.ops.dump import run_dump

    for spec in (folder_spec, wds_spec):  # warm-up (imports, allocator, thread pools, the shards' index), untimed
        for w in (0, 2):
            run_dump(replace(config("A", weights, spec, wd / "warm.zarr", w), rows=f"0:{min(args.n, 2 * BATCH)}"))
    cost = costs(folder_spec, weights)
    print("costs (ms/img): " + ", ".join(f"{k} {v:.2f}" for k, v in cost.items()), flush=True)
    rows = [ratio(folder_spec, weights, wd, int(w), args.reps, args.n) for w in args.ratio_workers.split(",")]
    print(common.table(rows, ["workers", "N", "one pass s", "separate s", "one/separate", "median round ratio",
                              "CPU s one/separate", "caches equal", "rounds used", "other CPU %", "load avg"]))
    wrows = [] if args.skip_workers else workers_rows({"imagefolder": folder_spec, "wds shards": wds_spec}, weights,
                                                      wd, args.reps, args.n)
    if wrows:
        print(common.table(wrows, ["dataset", "N", "0 workers samples/s", "2 workers samples/s", "2 workers / 0",
                                   "rounds used", "other CPU %", "load avg"]))
    common.write_results("decode", {
        "data": {**data, "images": images, "shards": shards}, "teachers": {k: list(v) for k, v in TEACHERS.items()},
        "pillow": PIL.__version__, "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "costs": cost, "ratio": rows, "workers": wrows,
        "target": {"one pass / separate dumps": "<= 0.65"}})


if __name__ == "__main__":
    main()
