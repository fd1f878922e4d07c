"""Stage 1: run a teacher once over a dataset and write its logits into a cache."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from kdcache.config import DumpConfig, default_run_dir
from kdcache.data.datasets import fingerprint, labels_sha256, open_dataset
from kdcache.data.hftok import check_model_vocab
from kdcache.data.render import ModelInput, image_only, model_input
from kdcache.data.sources import DatasetInfo, SourceDataset
from kdcache.data.views import VIEW_FIELDS, AugmentSpec, counter_uniforms, identity_views, sample_views
from kdcache.device import autocast, pick_device, to_model_layout
from kdcache.dist import init_from_env, shutdown
from kdcache.errors import KDCacheError
from kdcache.format.attrs import cache_attrs
from kdcache.format.spec import FEATURE_PREFIX, SAMPLING_DEFINITION, Layout, parse_rows
from kdcache.format.topk import draw_samples, to_topk
from kdcache.io.output import Output
from kdcache.io.writer import ChunkWriter, Rows
from kdcache.models import build_model, checkpoint_arch_args, load_weights, model_preprocess, published_classes
from kdcache.models.taps import FeatureSpec, pool, tap
from kdcache.progress import progress, say
from kdcache.storage.backends import Store

RESUME_KEYS = ("teacher", "weights_sha256", "dataset", "split", "fingerprint", "topk", "dtype", "image_size",
               "batch_size", "chunk_rows", "views", "augment", "seed", "rows", "seq_len", "features", "sample",
               "sample_temperature")


class ChunkBatches:
    """Dataset indices in batches that never cross a chunk boundary, made lazily (no per-sample list).

    Batches split the same way whatever chunks remain, so a resumed dump computes the same rows.
    `offset` is the dataset row of cache row 0 (a range cache's `--rows` start).
    """

    def __init__(self, layout: Layout, chunks: list[int], batch_size: int, offset: int = 0) -> None:
        self.layout, self.chunks, self.batch_size, self.offset = layout, chunks, batch_size, offset

    def __iter__(self) -> Iterator[range]:
        for c in self.chunks:
            sl = self.layout.chunk_slice(c)
            for s in range(sl.start, sl.stop, self.batch_size):
                yield range(self.offset + s, self.offset + min(s + self.batch_size, sl.stop))

    def __len__(self) -> int:
        return sum(-(-self._rows(c) // self.batch_size) for c in self.chunks)

    @property
    def rows(self) -> int:
        return sum(self._rows(c) for c in self.chunks)

    def _rows(self, c: int) -> int:
        sl = self.layout.chunk_slice(c)
        return sl.stop - sl.start


def _check_views(cfg: DumpConfig, ds: SourceDataset, aug: AugmentSpec) -> None:
    """Views are image crops: refused for tensors, and never V identical copies."""
    if not ds.info.is_image and (cfg.views > 1 or not aug.is_identity):
        raise image_only("--views" if cfg.views > 1 else "--augment", ds.info)
    if cfg.views > 1 and aug.is_identity:
        raise KDCacheError(f"--views {cfg.views} without --augment would store {cfg.views} identical copies of each "
                           "sample: add --augment SPEC (e.g. 'rrc(0.08,1)+flip', FKD's random-resized crops and "
                           "flips), or drop --views")


def value_dtype(cfg: DumpConfig, ds: SourceDataset) -> str:
    """--dtype as given; 'auto' is q8 for per-token top-k caches (where bytes per token matter most), else float16."""
    if cfg.dtype != "auto":
        return cfg.dtype
    return "q8" if ds.info.per_token and cfg.topk is not None and cfg.topk >= 2 else "float16"


def _attrs(cfg: DumpConfig, ds: SourceDataset, layout: Layout, teacher_id: dict, pre: ModelInput,
           aug: AugmentSpec, rows: tuple[int, int]) -> dict:
    fp = fingerprint(ds)
    whole = rows == (0, len(ds))
    span = None if whole else {"start": rows[0], "stop": rows[1],
                               "labels_sha256": labels_sha256(ds.labels[rows[0]:rows[1]])}
    info = ds.info
    dataset = {"spec": info.spec, "split": info.split, "n": len(ds), "num_classes": info.num_classes,
               "class_names": list(info.class_names), "input": info.input_json(), "fingerprint": fp,
               "labels_sha256": labels_sha256(ds.labels), "labelled": int((ds.labels >= 0).sum())}
    if info.is_image:
        dataset["base_shape"] = list(info.sample_shape)
    if info.vocab is not None:
        dataset["vocab"] = info.vocab
    if info.per_token:
        dataset |= {"label_shape": list(info.label_shape), "seq_len": cfg.seq_len, "tokenizer": cfg.tokenizer}
    return cache_attrs(
        layout,
        teacher={"name": cfg.teacher, "weights": teacher_id, "params": teacher_id.get("params"),
                 "arch_args": teacher_id.get("arch_args", {}), "preprocess": pre.to_json()},
        dataset=dataset,
        views={"fields": list(VIEW_FIELDS), "augment": str(aug), "augment_spec": aug.to_json(), "seed": cfg.seed},
        dump={"teacher": cfg.teacher, "weights_sha256": teacher_id.get("sha256"), "dataset": info.spec,
              "split": info.split, "fingerprint": fp, "topk": cfg.topk, "dtype": layout.value_dtype,
              "image_size": getattr(pre, "image_size", None), "batch_size": cfg.batch_size,
              "chunk_rows": layout.chunk_rows, "views": cfg.views, "augment": str(aug), "seed": cfg.seed,
              "rows": None if whole else list(rows), "seq_len": cfg.seq_len,
              "features": list(cfg.features) or None, "sample": cfg.sample,
              "sample_temperature": cfg.sample_temperature if cfg.sample else None},
        rows=span, command=cfg.command)


def resolve_weights(cfg: DumpConfig, num_classes: int) -> tuple[str, str]:
    """The teacher's weights and where they came from: --weights as given; else kdtrain's run of that name
    (runs/NAME/best.pt, what `kdtrain --student NAME` writes); else the published weights where their classes fit."""
    if cfg.weights is not None:
        return cfg.weights, "--weights"
    if cfg.teacher.startswith("hf:"):
        return "DEFAULT", f"the weights saved in {cfg.teacher[3:]}"
    run = os.path.join(default_run_dir(cfg.teacher), "best.pt")
    if os.path.isfile(run):
        return run, f"kdtrain's run of {cfg.teacher}"
    published = published_classes(cfg.teacher)
    if published == num_classes:
        return "DEFAULT", f"{'timm' if cfg.teacher.startswith('timm:') else 'torchvision'}'s published weights"
    why = (f"the published weights have {published} classes, the dataset {num_classes}"
           if published else f"{cfg.teacher} has no published weights")
    raise KDCacheError(f"no weights for teacher {cfg.teacher}: train it with 'kdtrain --student {cfg.teacher}' "
                       f"(dump then finds {run}), or pass --weights PATH ({why})")


def load_teacher(cfg: DumpConfig, info: DatasetInfo, pre: ModelInput, device: torch.device,
                 show: bool = False) -> tuple[torch.nn.Module, dict]:
    """The teacher in eval mode on `device`, with the identity of its weights (what the cache records)."""
    check_model_vocab(cfg.teacher, info.vocab)
    weights, source = resolve_weights(cfg, info.num_classes)
    say(f"teacher {cfg.teacher}: weights {weights} ({source})", show)
    args = checkpoint_arch_args(weights) | cfg.teacher_args
    model = build_model(cfg.teacher, info.num_classes, pre.input_shape, args, **info.model_inputs)
    ident = load_weights(model, weights, cfg.teacher) | {"arch_args": args}
    model.eval().to(device)
    if device.type == "cuda" and len(pre.input_shape) == 3:
        model = model.to(memory_format=torch.channels_last)
    return model, ident


# What every teacher of one pass must share (each has its own teacher, weights, out, image size, features).
SHARED = ("dataset", "split", "data_root", "download", "seq_len", "tokenizer", "topk", "dtype", "batch_size",
          "num_workers", "device", "chunk_rows", "compressor", "views", "augment", "seed", "rows", "resume",
          "overwrite", "sample", "sample_temperature")
SAMPLE_STREAM = 1  # the counter-based generator's stream for sampled soft labels (views use stream 0)


@dataclass
class _Teacher:
    """One teacher of a pass: its config, model, input, cache layout, output and (while writing) its writer."""

    cfg: DumpConfig
    model: torch.nn.Module
    input: ModelInput
    output: Output
    layout: Layout
    attrs: dict
    features: list[FeatureSpec]
    store: Store | None = None
    done: np.ndarray | None = None
    writer: ChunkWriter | None = None


def run_dump(cfg: DumpConfig) -> str:
    """Dump (or resume) a cache as `cfg` says; returns the path of the finished cache."""
    return run_dumps([cfg])[0]


def run_dumps(cfgs: list[DumpConfig]) -> list[str]:
    """Dump several teachers in one pass over the data: each sample is read, decoded and (for views) augmented
    once, then every teacher sees it at its own resolution and normalisation, and each writes its own cache —
    the same cache, array for array, that a separate dump of that teacher writes."""
    cfg = cfgs[0]
    for other in cfgs[1:]:
        for key in SHARED:
            if getattr(other, key) != getattr(cfg, key):
                raise KDCacheError(f"teachers dumped in one pass share --{key.replace('_', '-')}: got "
                                   f"{getattr(cfg, key)!r} and {getattr(other, key)!r}; dump them separately")
    if len(cfgs) > 1 and any(c.features for c in cfgs):
        raise KDCacheError("--features applies to a single --teacher (layer names are each architecture's own): "
                           "dump the teachers whose features you want one at a time")
    if len({os.path.realpath(c.out) if "://" not in c.out else c.out for c in cfgs}) < len(cfgs):
        raise KDCacheError("two teachers of one pass have the same --out: give each teacher its own --out")
    outputs = [Output(c.out, "dump", compressor=c.compressor) for c in cfgs]
    aug = AugmentSpec.parse(cfg.augment)
    ds = open_dataset(cfg.dataset, cfg.split, cfg.data_root, cfg.download, cfg.seq_len, cfg.tokenizer)
    _check_views(cfg, ds, aug)
    rows = parse_rows(cfg.rows, len(ds))
    # Chunk rows depend on the dataset, not the range, so range caches chunk like the whole dump would.
    positions = ds.info.label_shape[0] if ds.info.per_token else None
    logits = cfg.topk is not None or cfg.sample is None  # --sample alone: sampled soft labels only
    layout = Layout.for_dataset(rows[1] - rows[0], len(ds), cfg.views, ds.info.num_classes, cfg.topk,
                                value_dtype(cfg, ds), cfg.chunk_rows, positions, logits=logits, samples=cfg.sample)
    requested = pick_device(cfg.device)
    d = init_from_env(requested.type == "cuda")
    try:
        device = d.device(requested)
        teachers = []
        for c, output in zip(cfgs, outputs):
            pre = model_input(ds.info, c.image_size, model_preprocess(c.teacher, c.image_size))
            model, ident = load_teacher(c, ds.info, pre, device, c.progress and d.main)
            specs = [FeatureSpec.parse(f) for f in c.features]
            shapes = _feature_shapes(model, specs, ds, pre, device)
            lay = dataclasses.replace(layout, features=tuple(shapes))
            attrs = _attrs(c, ds, lay, ident, pre, aug, rows) | _extra_attrs(c, specs, shapes)
            teachers.append(_Teacher(c, model, pre, output, lay, attrs, specs))
        with ExitStack() as stack:  # rank 0 holds the locks for the whole job
            for t in teachers:
                d.on_main(lambda t=t: t.output.prepare(t.layout, t.attrs, stack, t.cfg.overwrite, t.cfg.resume,
                                                       RESUME_KEYS))
            for t in teachers:
                t.store = t.output.open()
                t.done = np.asarray(t.store["done"][...], dtype=bool)
            # Each rank takes every world_size-th chunk some teacher still lacks: resumable whatever the earlier
            # world size, and a chunk one teacher has done is not written to it again.
            todo = [c for c in range(layout.n_chunks) if not all(t.done[c] for t in teachers)][d.rank::d.world_size]
            batches = ChunkBatches(layout, todo, cfg.batch_size, offset=rows[0])
            _run_chunks(replace(cfg, progress=cfg.progress and d.main), teachers, ds, layout, batches, aug, device)
            d.barrier()
            for t in teachers:
                d.on_main(lambda t=t: t.output.finalize(t.store))
                t.store.close()
        for t in teachers:
            d.on_main(t.output.cleanup)
    finally:
        shutdown(d)
    return [c.out for c in cfgs]


def _feature_shapes(model: torch.nn.Module, specs: list[FeatureSpec], ds: SourceDataset, pre: ModelInput,
                    device: torch.device) -> list[tuple[int, ...]]:
    """Each cached feature's shape per row, from one forward pass of the teacher on the first sample."""
    if not specs:
        return []
    sample = ds[0][0][None].to(device)
    with tap(model, [f.layer for f in specs], "teacher") as seen, torch.inference_mode():
        model(to_model_layout(pre(sample, torch.from_numpy(identity_views(1)[:, 0]).to(device))))
    per_token = ds.info.per_token
    return [tuple(pool(seen[f.layer], f.pool, per_token).shape[2 if per_token else 1:]) for f in specs]


def _extra_attrs(cfg: DumpConfig, specs: list[FeatureSpec], shapes: list[tuple[int, ...]]) -> dict:
    """What cached features and sampled soft labels are, for readers (docs/FORMAT.md)."""
    out: dict = {}
    if specs:
        out["features"] = [{"layer": f.layer, "pool": f.pool, "shape": list(shape), "array": f"{FEATURE_PREFIX}{i}"}
                           for i, (f, shape) in enumerate(zip(specs, shapes))]
    if cfg.sample:
        out["sampling"] = {"m": cfg.sample, "temperature": cfg.sample_temperature, "seed": cfg.seed,
                           "stream": SAMPLE_STREAM, "definition": SAMPLING_DEFINITION}
    return out


def _run_chunks(cfg: DumpConfig, teachers: list[_Teacher], ds: SourceDataset, layout: Layout, batches: ChunkBatches,
                aug: AugmentSpec, device: torch.device) -> None:
    loader = DataLoader(ds, batch_sampler=batches, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    cuda = device.type == "cuda"
    for t in teachers:
        t.writer = ChunkWriter(t.store, t.layout)
    name = "+".join(t.cfg.teacher for t in teachers)
    try:
        with progress(total=batches.rows, desc=f"dump {name}", unit="sample", enable=cfg.progress) as bar, \
                torch.inference_mode():
            for samples, labels, idx in loader:
                idx_np = idx.numpy()
                start = int(idx_np[0]) - batches.offset
                views = identity_views(len(idx_np), cfg.views) if aug.is_identity \
                    else sample_views(aug, idx_np, cfg.views, cfg.seed)
                x = samples.to(device, non_blocking=True)
                v_t = torch.from_numpy(views).to(device, non_blocking=True)
                for t in teachers:
                    if t.done[start // layout.chunk_rows]:
                        continue  # this teacher's cache has the chunk already (a resumed pass)
                    out = _teacher_rows(t, x, v_t, idx_np, cfg, device, ds.info.per_token)
                    arrays: dict[str, object] = {k: a.to("cpu", non_blocking=cuda) for k, a in out.items()}
                    ready = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record()
                        ready = event.synchronize
                    arrays["labels"] = labels.numpy().astype(np.int64)
                    arrays["views"] = views
                    t.writer.put(Rows(start=start, arrays=arrays, ready=ready))
                bar.update(len(idx_np))
    finally:
        errors = []
        for t in teachers:
            try:
                t.writer.close()
            except KDCacheError as e:
                errors.append(e)
        if errors:
            raise errors[0]


def _teacher_rows(t: _Teacher, x: torch.Tensor, views: torch.Tensor, idx: np.ndarray, cfg: DumpConfig,
                  device: torch.device, per_token: bool) -> dict[str, torch.Tensor]:
    """One teacher's arrays for a batch, every view: logits (top-k + tail, or full), features, sampled labels."""
    logits, feats = [], {f"{FEATURE_PREFIX}{i}": [] for i in range(len(t.features))}
    with tap(t.model, [f.layer for f in t.features], "teacher") as seen:
        for v in range(cfg.views):
            with autocast(device):
                logits.append(t.model(to_model_layout(t.input(x, views[:, v]))).float())
            for i, f in enumerate(t.features):
                feats[f"{FEATURE_PREFIX}{i}"].append(pool(seen[f.layer], f.pool, per_token))
    z = torch.stack(logits, 1)  # (B, V, [L,] C)
    out = to_topk(z, cfg.topk, t.layout.value_dtype) if t.layout.logits else {}
    dtype = getattr(torch, t.layout.feature_dtype)
    out |= {name: torch.stack(parts, 1).to(dtype) for name, parts in feats.items()}
    if cfg.sample:
        m, lead = cfg.sample, z.shape[2:-1]  # token caches: one set of draws per position
        slots = np.arange(int(np.prod(lead, dtype=np.int64)) * m)
        u = counter_uniforms(cfg.seed, idx, cfg.views, slots, SAMPLE_STREAM).reshape(*z.shape[:-1], m)
        out |= draw_samples(z, m, cfg.sample_temperature, torch.from_numpy(u))
    return out
