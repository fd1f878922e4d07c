"""`kdcache dump` throughput vs bare teacher inference, and cache bytes per sample.

Part 1 -- throughput. Teachers cnn_s and cifar_resnet10 at width 16 (bench.synthdata.TEACHERS), random
weights, at 32 px, full fp16 logits into Zarr (blosc-zstd), batch 256, on
  digits        the embedded digits train split (1,437 images)
  digits x16k   bench.synthdata:digits_tiled, the same images repeated to 16,384 samples (a longer run,
                so fixed costs are amortised)
  dump   kdcache.ops.dump.run_dump(DumpConfig(..., progress=False)), whole call (teacher load + weights
         sha256 + dataset fingerprint + inference + writer + finalize); its `loop` (inference + writer
         thread + flush: from Output.open returning to Output.finalize) and `finalize` phases are marked
         through the public output lifecycle (bench/common.py DumpPhases; no kdcache file changed)
  bare   the same DataLoader over the same chunk-aligned batches (ops.dump.ChunkBatches), the teacher built
         and loaded as the dump does (models.build_model + load_weights), model input (data.render) +
         forward under inference_mode, nothing kept or written
Runs alternate (bare, dump, bare, dump, ...), each pair started in a quiet window (bench/common.py
quiet_gate: other processes using <= 10% of the machine, waiting at most 90 s); pairs during which other
jobs used more than 10% are dropped when at least two clean pairs remain (else all are kept and the row
says "contended"). Reported: medians, the ratio of the best runs, and the ratio of process CPU time (all
threads: inference, writer, zarr). Target: dump >= 0.9x bare.

Part 2 -- bytes per sample on a real teacher: cnn_s trained with
  kdtrain --student cnn_s --epochs 5 --out WORK/teacher --quiet --no-plots
then dumped on digits train as full logits and top-k (k = 1, 5) into Zarr (blosc-zstd, blosc-lz4, zstd,
gzip, none) and HDF5 (gzip, lzf, none). Bytes are the arrays' stored chunks; metadata files are counted
separately (they are a fixed ~KB per cache, large per sample only because digits is small).
Part 3 -- the same table for synthetic 1000-class class-prototype logits (bench/common.py), N=16,384,
top-k 1/5/10 and full: where the choice of layout matters.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import common, synthcache  # noqa: E402
from bench.synthdata import TEACHERS, random_teacher  # noqa: E402

ZARR = ("blosc-zstd", "blosc-lz4", "zstd", "gzip", "none")
HDF5 = ("gzip", "lzf", "none")
BATCH = 256


# --------------------------------------------------------------------------- part 1
def bare_inference(cfg) -> tuple[int, float, float]:
    """Model input + teacher forward over the dump's own loader and batches; returns (samples, wall s, CPU s)."""
    from torch.utils.data import DataLoader

    from kdcache.data.datasets import open_dataset
    from kdcache.data.render import model_input
    from kdcache.data.views import identity_views
    from kdcache.format.spec import Layout
    from kdcache.models import build_model, checkpoint_arch_args, load_weights
    from kdcache.ops.dump import ChunkBatches, value_dtype

    ds = open_dataset(cfg.dataset, cfg.split)
    pre = model_input(ds.info, cfg.image_size)
    layout = Layout.for_dataset(len(ds), len(ds), 1, ds.info.num_classes, cfg.topk, value_dtype(cfg, ds),
                                cfg.chunk_rows)
    teacher = build_model(cfg.teacher, num_classes=ds.info.num_classes, input_shape=pre.input_shape,
                          **checkpoint_arch_args(cfg.weights) | cfg.teacher_args)
    load_weights(teacher, cfg.weights, cfg.teacher)
    teacher.eval()
    loader = DataLoader(ds, batch_sampler=ChunkBatches(layout, list(range(layout.n_chunks)), cfg.batch_size),
                        num_workers=0)
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for samples, labels, idx in loader:
            views = torch.from_numpy(identity_views(len(idx), 1))
            teacher(pre(samples, views[:, 0])).float()
            n += len(idx)
    return n, time.perf_counter() - t0, time.process_time() - c0


def throughput(wd: Path, reps: int, tiled_n: int) -> list[dict]:
    from kdcache.config import DumpConfig
    from kdcache.ops.dump import run_dump

    os.environ["KDBENCH_N"] = str(tiled_n)
    rows = []
    for short in TEACHERS:
        name, w = random_teacher(short, 32, wd)
        for ds_label, spec in (("digits", "digits"), (f"digits x{tiled_n}", "bench.synthdata:digits_tiled")):
            cfg = DumpConfig(teacher=name, weights=w, dataset=spec, out=str(wd / f"tp_{short}.zarr"),
                             overwrite=True, progress=False, batch_size=BATCH)
            bare_inference(cfg)  # warm-up (allocator, thread pool)
            bare, dump, loop, fin, bare_cpu, dump_cpu, others = [], [], [], [], [], [], []
            for _ in range(reps):
                common.quiet_gate()
                with common.Contention() as c1:
                    n, dt, cpu = bare_inference(cfg)
                bare.append(n / dt)
                bare_cpu.append(cpu)
                with common.DumpPhases() as ph, common.Contention() as c2:
                    t0, c0 = time.perf_counter(), time.process_time()
                    run_dump(cfg)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                dump.append(n / wall)
                dump_cpu.append(cpu)
                loop.append(n / ph.loop_s)
                fin.append(ph.finalize_s)
                others.append(max(c1.other, c2.other))
            # keep the (bare, dump) pairs measured while other jobs left the machine (nearly) alone
            keep, clean = common.quiet_indices(others)
            bare, dump, loop, fin, bare_cpu, dump_cpu = ([xs[i] for i in keep]
                                                        for xs in (bare, dump, loop, fin, bare_cpu, dump_cpu))
            b, d, lp = common.median(bare), common.median(dump), common.median(loop)
            rows.append({"teacher": short, "dataset": ds_label, "N": n, "bare samples/s": b,
                         "dump samples/s": d, "dump/bare": d / b, "dump/bare (best)": max(dump) / max(bare),
                         "dump/bare (CPU time)": common.median(bare_cpu) / common.median(dump_cpu),
                         "bare CPU s": common.median(bare_cpu), "dump CPU s": common.median(dump_cpu),
                         "loop samples/s": lp, "loop/bare": lp / b, "loop/bare (best)": max(loop) / max(bare),
                         "fixed s": n / d - n / lp, "finalize s": common.median(fin),
                         "pairs used": f"{len(keep)}/{reps}" + ("" if clean else " (contended)"),
                         "other CPU %": 100 * max(others[i] for i in keep) if clean else 100 * common.median(others),
                         "other CPU % per pair": [round(100 * o, 1) for o in others]})
            print(f"  {short:19s} {ds_label:14s} bare {b:>8,.0f}/s  dump {d:>8,.0f}/s ({d / b:.3f}x)  "
                  f"loop {lp:>8,.0f}/s ({lp / b:.3f}x)", flush=True)
    return rows


# --------------------------------------------------------------------------- parts 2 and 3
def array_bytes(path: str) -> dict[str, int]:
    return common.zarr_array_bytes(path) if path.endswith(".zarr") else common.h5_array_bytes(path)


def bytes_row(label: str, fmt: str, comp: str, path: str, n: int) -> dict:
    ab = array_bytes(path)
    logits = sum(ab.get(a, 0) for a in ("values", "indices", "tail"))
    data = sum(ab.values())
    total = common.disk_bytes(path)
    return {"layout": label, "format": fmt, "compressor": comp, "logit B/sample": logits / n,
            "labels+views B/sample": (ab.get("labels", 0) + ab.get("views", 0)) / n, "data B/sample": data / n,
            "metadata B": total - data, "total bytes": total}


def train_teacher(wd: Path, epochs: int) -> tuple[str, dict]:
    out = wd / "teacher_cnn_s"
    ckpt = out / "best.pt"
    cmd = [common.venv_bin("kdtrain"), "--student", "cnn_s", "--epochs", str(epochs), "--out", str(out),
           "--overwrite", "--quiet", "--no-plots"]
    r = common.run_measured(cmd, log=wd / "teacher_log.txt")
    if r["rc"] != 0:
        sys.exit("teacher training failed:\n" + (wd / "teacher_log.txt").read_text()[-2000:])
    print(f"  trained cnn_s teacher in {r['wall_s']:.1f} s: " + (wd / "teacher_log.txt").read_text().strip(), flush=True)
    return str(ckpt), {"command": r["cmd"], "wall_s": r["wall_s"]}


def bytes_real(wd: Path, ckpt: str) -> tuple[list[dict], dict]:
    from kdcache.config import DumpConfig
    from kdcache.io import open_cache
    from kdcache.ops.dump import run_dump

    d = wd / "bytes"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    rows, stats = [], {}
    for k in (None, 1, 5):
        label = "full (10)" if k is None else f"top-{k}"
        for fmt, comps in (("zarr", ZARR), ("hdf5", HDF5)):
            for comp in comps:
                out = str(d / f"{label.split(' ')[0]}_{comp}.{'zarr' if fmt == 'zarr' else 'h5'}")
                run_dump(DumpConfig(teacher="cnn_s", weights=ckpt, dataset="digits", out=out, topk=k,
                                    compressor=comp, progress=False, batch_size=BATCH))
                with open_cache(out) as c:
                    n = c.n
                    stats[label] = c.attrs.get("stats")
                rows.append(bytes_row(label, fmt, comp, out, n))
    return rows, stats


def bytes_synthetic(wd: Path, n: int) -> list[dict]:
    d = wd / "bytes_synth"
    labels = np.random.default_rng(1).integers(0, 1000, n)
    rows = []
    for k in (None, 1, 5, 10):
        label = "full (1000)" if k is None else f"top-{k}"
        for fmt, comps in (("zarr", ZARR), ("hdf5", HDF5)):
            for comp in comps:
                out = d / f"{label.split(' ')[0]}_{comp}.{'zarr' if fmt == 'zarr' else 'h5'}"
                synthcache.make_cache(out, labels=labels, num_classes=1000, k=k, compressor=comp, verbose=False)
                rows.append(bytes_row(label, fmt, comp, str(out), n))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tiled-n", type=int, default=16384)
    ap.add_argument("--teacher-epochs", type=int, default=5)
    ap.add_argument("--synthetic-n", type=int, default=16384, help="N of the 1000-class table (0 = skip)")
    ap.add_argument("--skip-bytes", action="store_true")
    ap.add_argument("--results-name", default="dump_throughput", help="bench/results/<name>.json")
    args = ap.parse_args()
    common.setup_torch()
    wd = common.workdir("dump")
    tp = throughput(wd, args.reps, args.tiled_n)
    cols = ["teacher", "dataset", "N", "bare samples/s", "dump samples/s", "dump/bare", "dump/bare (best)",
            "dump/bare (CPU time)", "loop/bare", "loop/bare (best)", "fixed s", "finalize s", "pairs used", "other CPU %"]
    print()
    print(common.table(tp, cols))
    verdict = [{"teacher": r["teacher"], "dataset": r["dataset"], "dump_over_bare": r["dump/bare"],
                "met": r["dump/bare"] >= 0.9} for r in tp]
    payload: dict = {"throughput": tp, "target": verdict, "batch": BATCH}
    if not args.skip_bytes:
        ckpt, teacher = train_teacher(wd, args.teacher_epochs)
        real, stats = bytes_real(wd, ckpt)
        bcols = ["layout", "format", "compressor", "logit B/sample", "labels+views B/sample", "data B/sample",
                 "metadata B", "total bytes"]
        print("\nbytes per sample, trained cnn_s on digits train (1,437):")
        print(common.table(real, bcols))
        payload |= {"bytes_real": real, "teacher": teacher, "teacher_stats": stats}
        if args.synthetic_n:
            synth = bytes_synthetic(wd, args.synthetic_n)
            print(f"\nbytes per sample, synthetic 1000-class logits, N={args.synthetic_n:,}:")
            print(common.table(synth, bcols))
            payload |= {"bytes_synthetic": synth, "synthetic_logits": synthcache.PrototypeTeacher(1000).describe()}
    print("\ntarget dump >= 0.9x bare: " + ", ".join(
        f"{v['teacher']} {v['dataset']}: {v['dump_over_bare']:.3f} ({'met' if v['met'] else 'MISSED'})" for v in verdict))
    common.write_results(args.results_name, payload)


if __name__ == "__main__":
    main()
