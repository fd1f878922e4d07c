"""Token caches (issue #13): bytes per token and KL, streaming reader throughput, dump vs bare inference.

Part 1 -- bytes per token and KL. LM-like teacher logits (`LMLogits`: a Zipf unigram over a BPE-like id order, a
  context term from random 64-d token embeddings, 4-256 boosted continuations per position, each position's
  temperature solved for an entropy drawn from LogNormal(log 1.6, 0.5) in [0.5, 4] nats) for V = 32,768 (uint16
  ids) and 128,256 (int32 ids), L = 128 positions per sequence. Each (k, value dtype) cache is written as
  `kdcache dump` writes one: format.topk.to_topk, format.attrs.cache_attrs, io.output.Output prepare/open ->
  io.writer.ChunkWriter -> finalize, default compressor (Zarr blosc-zstd), over a `tokens:DIR` dataset of the
  next-token labels. Bytes = the stored chunks of values (or q8 top + codes), indices and tail over the tokens.
  KL(teacher's full softmax || what the cache keeps) is computed from the arrays read back by Cache.read, by
  format.topk's rule (the rest's mass spread evenly over the V - k other ids, float64); "floor" is the same with
  the exact float32 top-k logits (truncation alone), dKL = KL - floor (the value encoding's cost).
  References on the same logits: Megatron-style (fp16 values + int32 ids, zstd-3) and NeMo-Aligner JSONL
  (`topk_logits`, `topk_token_ids`, `log_sum_exp_logits`, as torch's tolist() prints them); DistillKit's
  published ~300 / ~114 B/token and the issue's Megatron ~528 B/token (17-bit ids, before zstd) as constants.
Part 2 -- streaming reader, k = 64, V = 32,768: a cache of --stream-seqs sequences made of part 1's k = 64 rows
  (each block of sequences a fresh permutation), read by kdtrain's loader (train.batches.PairedLoader: chunk-aware
  windows, prefetch, release, DataLoader of the token windows, SoftTargets as float32 torch tensors) with the
  default LRU and with one holding two windows; tokens/s over --stream-seconds (epochs repeat). `decode, 1 thread`
  = Cache.decoded_chunk of every chunk in a loop (zarr read + CRC-32 + q8 decode), the reader's core cost.
Part 3 -- dump vs bare inference: gpt_nano (random weights) over `pydoc` (V = 256) and a V = 32,768 tokens:
  dataset, --seq-len 128, top-64, --dtype auto (q8). `dump` = ops.dump.run_dump (whole call); `bare` = the same
  DataLoader over the same ChunkBatches, the teacher built and loaded as the dump builds it, forward under
  inference_mode, nothing written; `bare+to_topk` adds format.topk.to_topk; `dump loop` = Output.open ->
  Output.finalize (common.DumpPhases: no fixed costs). Runs alternate; medians; also as ratios of process CPU
  time (robust to other jobs on the machine).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.lmlogits import LMLogits, kl_stats, truth_of  # noqa: E402
from bench.synthcache import write_chunks  # noqa: E402

L, KS, DTYPES = 128, (16, 64, 128), ("q8", "float16")
MEGATRON_528, DISTILLKIT, DISTILLKIT_BUDGET = 128 * (2 + 17 / 8), 300.0, 114.0
TARGET_BYTES, TARGET_TOKENS_S, TARGET_DUMP = 300.0, 2_000_000, 0.9


def token_dataset(folder: Path, labels: np.ndarray, V: int):
    """A nanoGPT-style `tokens:DIR` dataset whose windows of L have exactly these next-token labels."""
    from kdcache.data.datasets import open_dataset

    folder.mkdir(parents=True, exist_ok=True)
    dt = "uint16" if V <= 1 << 16 else "uint32"
    np.concatenate([[0], labels.reshape(-1)]).astype(dt).tofile(folder / "train.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": V, "dtype": dt, "tokenizer": f"bench-{V}"}))
    return open_dataset(f"tokens:{folder}", "train", seq_len=L)


def write_cache(path: Path, ds, k: int, dtype: str, chunk_arrays) -> float:
    """A token cache written through the dump's Output + ChunkWriter; chunk_arrays(layout, c) gives chunk c's
    to_topk arrays ((R, 1, L, ...) each). Returns seconds."""
    from kdcache.data.datasets import identity
    from kdcache.data.render import model_input
    from kdcache.data.views import VIEW_FIELDS, AugmentSpec
    from kdcache.format.attrs import cache_attrs
    from kdcache.format.spec import Layout
    from kdcache.io.output import Output

    info, aug, ident = ds.info, AugmentSpec(), identity(ds)
    lay = Layout.for_dataset(len(ds), len(ds), 1, info.num_classes, k, dtype, None, positions=L)
    attrs = cache_attrs(
        lay, teacher={"name": "bench:lm-logits", "weights": {"source": "synthetic", "sha256": None, "params": 0},
                      "params": 0, "arch_args": {}, "preprocess": model_input(info, None).to_json()},
        dataset={"spec": info.spec, "split": info.split, **ident, "input": info.input_json(),
                 "labelled": int((np.asarray(ds.labels) >= 0).sum()), "label_shape": list(info.label_shape),
                 "seq_len": L, "tokenizer": None},
        views={"fields": list(VIEW_FIELDS), "augment": str(aug), "augment_spec": aug.to_json(), "seed": 0},
        dump={"teacher": "bench:lm-logits", "weights_sha256": None, "dataset": info.spec, "split": info.split,
              "fingerprint": ident["fingerprint"], "topk": k, "dtype": dtype, "image_size": None,
              "batch_size": lay.chunk_rows, "chunk_rows": lay.chunk_rows, "views": 1, "augment": str(aug),
              "seed": 0, "rows": None, "seq_len": L},
        command=common.command_line())
    t0 = time.perf_counter()
    write_chunks(Output(str(path), "write"), lay, attrs, ds.labels, lambda c: chunk_arrays(lay, c))
    return time.perf_counter() - t0


def reference_bytes(t: dict, k: int, tail: np.ndarray, n_jsonl: int = 2048) -> dict:
    """Other systems' layouts of the same top-k rows: Megatron-style fp16 values + int32 ids under zstd-3, and
    NeMo-Aligner JSONL (one record per sequence of L tokens, floats as torch's tolist() prints them; also zlib-6)."""
    import numcodecs

    n = len(tail)
    raw = np.concatenate([t["vals"][:, :k].astype(np.float16).view(np.uint8).reshape(n, -1),
                          t["ids"][:, :k].astype(np.int32).view(np.uint8).reshape(n, -1)], 1)
    zstd = sum(len(numcodecs.Zstd(level=3).encode(np.ascontiguousarray(raw[i:i + 16384])))
               for i in range(0, n, 16384))
    m = min(n, n_jsonl) // L * L
    lines = "".join(json.dumps({"topk_logits": torch.from_numpy(t["vals"][s:s + L, :k]).tolist(),
                                "topk_token_ids": t["ids"][s:s + L, :k].tolist(),
                                "log_sum_exp_logits": torch.from_numpy(t["lse"][s:s + L].astype(np.float32)).tolist()})
                    + "\n" for s in range(0, m, L)).encode()
    return {"megatron-style fp16+int32 raw": raw.shape[1], "megatron-style zstd-3": zstd / n,
            "NeMo-Aligner JSONL": len(lines) / m, "NeMo-Aligner JSONL zlib-6": len(zlib.compress(lines, 6)) / m}


def bytes_part(wd: Path, V: int, n_seq: int, seed: int, batch_seqs: int = 2) -> tuple[list[dict], dict, dict]:
    """Part 1 for one vocabulary: rows of the table, the teacher's statistics, the k = 64 arrays (part 2's pool)."""
    from kdcache.format.topk import to_topk
    from kdcache.io import open_cache

    gen, rng, t0 = LMLogits(V, seed), np.random.default_rng(seed + 17), time.perf_counter()
    parts: dict = {(k, d): [] for k in KS for d in DTYPES}
    truths, labels = [], []
    for b, s0 in enumerate(range(0, n_seq, batch_seqs)):
        ns = min(batch_seqs, n_seq - s0)
        logits = gen(ns * L, b)
        truths.append(truth_of(logits))
        for (k, d), acc in parts.items():
            acc.append({n: a.numpy() for n, a in to_topk(logits.view(ns, 1, L, V), k, d).items()})
        tv = truths[-1]["vals"].astype(np.float64)  # next token: drawn from the teacher's top 128 (Gumbel-max)
        pick = np.argmax(tv - np.log(-np.log(rng.random(tv.shape))), 1)
        labels.append(truths[-1]["ids"][np.arange(len(pick)), pick].reshape(ns, L))
    gen_s = time.perf_counter() - t0
    t = {n: np.concatenate([p[n] for p in truths]) for n in truths[0]}
    arrays = {key: {n: np.concatenate([p[n] for p in acc]) for n in acc[0]} for key, acc in parts.items()}
    ds, tokens = token_dataset(wd / f"tokens_v{V}", np.concatenate(labels), V), n_seq * L
    H = t["H"]
    teacher = {"V": V, "tokens": tokens, "generate_s": gen_s, "entropy mean": float(H.mean()),
               "entropy p5/p50/p95": np.percentile(H, [5, 50, 95]).tolist(),
               **{f"top-{k} mass": float(np.exp(t["vals"][:, :k] - t["lse"][:, None]).sum(1).mean()) for k in KS}}
    print(f"[part 1] V={V:,}: {tokens:,} tokens generated in {gen_s:.0f} s; entropy mean {H.mean():.2f} nats, "
          f"top-128 mass {teacher['top-128 mass']:.3f}", flush=True)
    rows = []
    for k in KS:
        for d in DTYPES:
            path, got = wd / f"bytes_v{V}_k{k}_{d}.zarr", arrays[(k, d)]
            write_s = write_cache(path, ds, k, d, lambda lay, c, got=got: {n: a[lay.chunk_slice(c)]
                                                                             for n, a in got.items()})
            ab = common.zarr_array_bytes(path)
            with open_cache(str(path)) as cache:
                back, ids = cache.read(np.arange(cache.n)), cache.attrs["index_dtype"]
            vals, idx = back.values.reshape(tokens, k).numpy(), back.indices.reshape(tokens, k).numpy()
            tail = back.tail.reshape(tokens).numpy()
            b = {n: ab.get(n, 0) / tokens for n in ("values", "top", "codes", "indices", "tail")}
            logit_b = sum(b.values())
            rows.append({"V": V, "k": k, "values": d, "ids": ids, "B/token": logit_b,
                         "values B": b["values"] + b["top"] + b["codes"], "ids B": b["indices"], "tail B": b["tail"],
                         "raw B": (4 + (k - 1) if d == "q8" else 2 * k) + k * np.dtype(ids).itemsize + 4,
                         "x DistillKit": logit_b / DISTILLKIT, **kl_stats(t, vals, idx, tail, V), "write s": write_s})
            print(f"  k={k:3d} {d:7s} {logit_b:6.1f} B/token; KL {rows[-1]['KL']:.4f} (dKL {rows[-1]['dKL']:.1e})",
                  flush=True)
        refs = reference_bytes(t, k, arrays[(k, "float16")]["tail"].reshape(-1))
        rows += [{"V": V, "k": k, "values": name, "B/token": v} for name, v in refs.items()]
    return rows, teacher, {"arrays": {d: arrays[(64, d)] for d in DTYPES}, "labels": np.concatenate(labels)}


def read_loader(path: str, ds, seconds: float, batch: int, lru: int) -> dict:
    """kdtrain's loader over the cache: tokens/s delivered as SoftTarget tensors (epochs repeat until `seconds`)."""
    from kdcache.io import open_cache
    from kdcache.train.batches import PairedLoader

    with open_cache(path, lru_bytes=lru) as cache:
        loader, tokens, epoch = PairedLoader(ds, [cache], batch, seed=0), 0, 0
        t0, c0 = time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            for b in loader.epoch(epoch):
                tokens += b.labels.numel()
                if time.perf_counter() - t0 >= seconds:
                    break
            epoch += 1
        dt = time.perf_counter() - t0
        return {"tokens/s": tokens / dt, "CPU s per s": (time.process_time() - c0) / dt,
                "decodes per chunk": cache.chunks_decoded / (tokens / (cache.layout.chunk_rows * L))}


def read_decode(path: str, seconds: float) -> dict:
    from kdcache.io import open_cache

    with open_cache(path) as cache:
        tokens, c, t0, c0 = 0, 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            tokens += cache.decoded_chunk(c % cache.layout.n_chunks)["labels"].size
            c += 1
        dt = time.perf_counter() - t0
        return {"tokens/s": tokens / dt, "CPU s per s": (time.process_time() - c0) / dt, "decodes per chunk": 1.0}


def reader_part(wd: Path, pool: dict, n_seq: int, args) -> list[dict]:
    from kdcache.io import open_cache
    from kdcache.io.reader import DEFAULT_LRU_BYTES
    from kdcache.train.align import check_alignment

    rng = np.random.default_rng(args.seed + 101)
    npool = len(pool["labels"])
    arr = np.concatenate([rng.permutation(npool) for _ in range(-(-n_seq // npool))])[:n_seq]
    ds = token_dataset(wd / "tokens_stream", pool["labels"][arr], 32768)
    runs: dict = {}
    for d in DTYPES:
        path, src = str(wd / f"stream_k64_{d}.zarr"), pool["arrays"][d]
        secs = write_cache(Path(path), ds, 64, d, lambda lay, c, src=src: {n: a[arr[lay.chunk_slice(c)]]
                                                                            for n, a in src.items()})
        with open_cache(path) as cache:
            check_alignment([cache], ds)  # what kdtrain checks first
            chunk_mib = (cache.decoded_bytes() + cache.n * L * 8) / cache.layout.n_chunks / 2**20
            info = f"{common.disk_bytes(path) / n_seq / L:.1f} B/token on disk, chunk {cache.layout.chunk_rows} seqs"
        lru2 = int(math.ceil(8 * chunk_mib)) << 20
        print(f"[part 2] {d}: {n_seq * L:,} tokens written in {secs:.1f} s ({info}, {chunk_mib:.1f} MiB decoded)",
              flush=True)
        for rep in range(args.stream_reps):
            for how, fn in ((f"loader, LRU {DEFAULT_LRU_BYTES >> 20} MiB (default)",
                             lambda: read_loader(path, ds, args.stream_seconds, args.batch_seqs, DEFAULT_LRU_BYTES)),
                            (f"loader, LRU {lru2 >> 20} MiB (2 windows)",
                             lambda: read_loader(path, ds, args.stream_seconds, args.batch_seqs, lru2)),
                            ("decode only, 1 thread", lambda: read_decode(path, args.stream_seconds / 2))):
                common.quiet_gate(timeout_s=args.gate_s)
                with common.Contention() as cont:
                    r = fn()
                runs.setdefault((d, how), []).append(r | {"other": cont.other})
                print(f"  {how:30s} {r['tokens/s']:>12,.0f} tokens/s (other CPU {100 * cont.other:.0f}%)", flush=True)
    rows = []
    for (d, how), rs in runs.items():
        keep, clean = common.quiet_indices([r["other"] for r in rs], min_keep=1)
        rows.append({"values": d, "read": how, **{n: common.median([rs[i][n] for i in keep]) for n in rs[0]
                                                  if n != "other"},
                     "best tokens/s": max(r["tokens/s"] for r in rs),
                     "tokens per CPU s": common.median([rs[i]["tokens/s"] / rs[i]["CPU s per s"] for i in keep]),
                     "runs used": f"{len(keep)}/{len(rs)}" + ("" if clean else " (contended)"),
                     "other CPU %": 100 * common.median([rs[i]["other"] for i in keep])})
    return rows


def bare_inference(cfg, with_to_topk: bool) -> tuple[int, float, float]:
    """The dump's DataLoader and ChunkBatches, its teacher, forward (+ to_topk); nothing written."""
    from torch.utils.data import DataLoader

    from kdcache.data.datasets import open_dataset
    from kdcache.data.render import model_input
    from kdcache.data.views import identity_views
    from kdcache.format.spec import Layout
    from kdcache.format.topk import to_topk
    from kdcache.models import build_model, checkpoint_arch_args, load_weights
    from kdcache.ops.dump import ChunkBatches, value_dtype

    ds = open_dataset(cfg.dataset, cfg.split, seq_len=cfg.seq_len)
    info, dt = ds.info, value_dtype(cfg, ds)
    pre = model_input(info, None)
    lay = Layout.for_dataset(len(ds), len(ds), 1, info.num_classes, cfg.topk, dt, None, info.label_shape[0])
    model = build_model(cfg.teacher, info.num_classes, pre.input_shape, checkpoint_arch_args(cfg.weights),
                        **info.model_inputs)
    load_weights(model, cfg.weights, cfg.teacher)
    model.eval()
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for samples, labels, idx in DataLoader(ds, batch_sampler=ChunkBatches(lay, list(range(lay.n_chunks)),
                                                                              cfg.batch_size)):
            logits = model(pre(samples, torch.from_numpy(identity_views(len(idx), 1))[:, 0])).float()
            if with_to_topk:
                to_topk(logits[:, None], cfg.topk, dt)
            n += labels.numel()
    return n, time.perf_counter() - t0, time.process_time() - c0


def dump_part(wd: Path, labels: np.ndarray, args) -> list[dict]:
    from kdcache.config import DumpConfig
    from kdcache.models import build_model
    from kdcache.ops.dump import run_dump

    token_dataset(wd / "tokens_dump", labels[:args.dump_v32k_seqs], 32768)
    rows = []
    for name, spec, split, V, batch in (("pydoc (V=256)", "pydoc", "test", 256, 32),
                                        ("tokens (V=32,768)", f"tokens:{wd / 'tokens_dump'}", "train", 32768, 8)):
        torch.manual_seed(0)
        weights = wd / f"gpt_nano_v{V}.pt"
        torch.save({"model": build_model("gpt_nano", V, (L,), vocab_size=V).state_dict(), "arch_args": {}}, weights)
        cfg = DumpConfig(teacher="gpt_nano", weights=str(weights), dataset=spec, split=split, seq_len=L, topk=64,
                         dtype="auto", out=str(wd / f"dump_v{V}.zarr"), overwrite=True, progress=False,
                         batch_size=batch)
        bare_inference(cfg, False)  # warm-up
        res: dict = {k: [] for k in ("bare", "bare+to_topk", "dump", "bare CPU", "bare+to_topk CPU", "dump CPU", "loop/bare", "other")}
        for _ in range(args.dump_reps):
            common.quiet_gate(timeout_s=args.gate_s)
            with common.Contention() as cont:
                n, s1, c1 = bare_inference(cfg, False)
                _, s2, c2 = bare_inference(cfg, True)
                t0, c0 = time.perf_counter(), time.process_time()
                with common.DumpPhases() as ph:
                    run_dump(cfg)
                s3, c3 = time.perf_counter() - t0, time.process_time() - c0
            res["loop/bare"].append(s1 / ph.loop_s)
            for key, s, c in (("bare", s1, c1), ("bare+to_topk", s2, c2), ("dump", s3, c3)):
                res[key].append(n / s)
                res[f"{key} CPU"].append(c)
            res["other"].append(cont.other)
            print(f"[part 3] {name}: bare {n / s1:,.0f}, bare+to_topk {n / s2:,.0f}, dump {n / s3:,.0f} tokens/s "
                  f"({s1 / s3:.3f}x, CPU s {c1 / c3:.3f}x; other CPU {100 * cont.other:.0f}%)", flush=True)
        keep, clean = common.quiet_indices(res["other"])
        m = {k: common.median([v[i] for i in keep]) for k, v in res.items()}
        rows.append({"dataset": name, "tokens": n, "batch seqs": batch, "bare tokens/s": m["bare"],
                     "bare+to_topk tokens/s": m["bare+to_topk"], "dump tokens/s": m["dump"],
                     "dump/bare": common.median([res["dump"][i] / res["bare"][i] for i in keep]),
                     "dump loop/bare": m["loop/bare"],
                     "to_topk/bare": common.median([res["bare+to_topk"][i] / res["bare"][i] for i in keep]),
                     "dump/bare (CPU s)": common.median([res["bare CPU"][i] / res["dump CPU"][i] for i in keep]),
                     "to_topk/bare (CPU s)": common.median([res["bare CPU"][i] / res["bare+to_topk CPU"][i]
                                                            for i in keep]),
                     "dump/(bare+to_topk) (CPU s)": common.median([res["bare+to_topk CPU"][i] / res["dump CPU"][i]
                                                                   for i in keep]),
                     "pairs used": f"{len(keep)}/{len(res['other'])}" + ("" if clean else " (contended)"),
                     "other CPU %": 100 * m["other"], "runs": res})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="1,2,3", help="parts to run (2 and 3 use part 1's V=32,768 rows)")
    ap.add_argument("--seqs", default="128,16", help="sequences of 128 tokens for V=32,768 and V=128,256 (0 = skip)")
    ap.add_argument("--stream-seqs", type=int, default=4096, help="sequences in part 2's caches")
    ap.add_argument("--stream-seconds", type=float, default=5.0)
    ap.add_argument("--stream-reps", type=int, default=2)
    ap.add_argument("--batch-seqs", type=int, default=128, help="training batch in sequences (kdtrain's default)")
    ap.add_argument("--dump-v32k-seqs", type=int, default=24, help="sequences of the V=32,768 dump")
    ap.add_argument("--dump-reps", type=int, default=3)
    ap.add_argument("--gate-s", type=float, default=10.0, help="longest wait for a quiet window per measurement")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    common.setup_torch()
    wd, t_start = common.workdir("tokens"), time.perf_counter()
    out: dict = {"seq_len": L, "loadavg_1min": {"start": common.loadavg()}, "targets": [],
                 "references": {"Megatron-LM (issue: top-128 fp16 + 17-bit ids, before zstd)": MEGATRON_528,
                                "DistillKit recommended (k=128)": DISTILLKIT, "DistillKit budget": DISTILLKIT_BUDGET}}
    n32, n128 = (int(x) for x in args.seqs.split(","))
    rows, out["teachers"], pool = [], [], None
    for V, n in ((32768, n32), (128256, n128)):
        if n and (V == 32768 or 1 in parts):
            r, teacher, p = bytes_part(wd, V, n, args.seed)
            rows += r
            out["teachers"].append(teacher)
            pool = p if V == 32768 else pool
    if 1 in parts:
        out["bytes"] = rows
        out["loadavg_1min"]["part 1"] = common.loadavg()
        print("\n" + common.table(rows, ["V", "k", "values", "ids", "B/token", "values B", "ids B", "tail B", "raw B",
                                        "x DistillKit", "KL", "KL floor", "dKL"]))
        out["targets"] += [{"what": f"bytes/token k=128 V={r['V']} {r['values']}", "measured": r["B/token"],
                            "target": f"< {TARGET_BYTES:.0f}", "met": r["B/token"] < TARGET_BYTES}
                           for r in rows if r["k"] == 128 and r["values"] in DTYPES]
    if 2 in parts:
        out["reader"] = reader_part(wd, pool, args.stream_seqs, args)
        out["loadavg_1min"]["part 2"] = common.loadavg()
        print("\n" + common.table(out["reader"]))
        out["targets"] += [{"what": f"reader k=64 {r['values']} {r['read']}", "measured": r["tokens/s"],
                            "target": f">= {TARGET_TOKENS_S:,}", "met": r["tokens/s"] >= TARGET_TOKENS_S}
                           for r in out["reader"] if r["read"].startswith("loader")]
    if 3 in parts:
        out["dump"] = dump_part(wd, pool["labels"], args)
        out["loadavg_1min"]["part 3"] = common.loadavg()
        print("\n" + common.table(out["dump"], [c for c in out["dump"][0] if c != "runs"]))
        out["targets"] += [{"what": f"dump/bare {r['dataset']}", "measured": r["dump/bare"],
                            "target": f">= {TARGET_DUMP}", "met": r["dump/bare"] >= TARGET_DUMP} for r in out["dump"]]
        out["targets"] += [{"what": f"dump/bare (CPU s) {r['dataset']}", "measured": r["dump/bare (CPU s)"],
                            "target": f">= {TARGET_DUMP}", "met": r["dump/bare (CPU s)"] >= TARGET_DUMP}
                           for r in out["dump"]]
    out["total_s"] = time.perf_counter() - t_start
    print("\ntargets:")
    for t in out["targets"]:
        print(f"  {t['what']}: {common._fmt(float(t['measured']))} ({t['target']}) -> {'met' if t['met'] else 'MISSED'}")
    print(f"load average {out['loadavg_1min']}; total {out['total_s']:.0f} s")
    common.write_results("tokens", out)


if __name__ == "__main__":
    main()
