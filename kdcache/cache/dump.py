"""Stage 1: run a teacher once over a dataset and write its logits into a cache."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from kdcache import __version__
from kdcache.cache import finalize
from kdcache.cache.derive import check_target, refuse_foreign
from kdcache.cache.format import (
    FORMAT_NAME,
    STATUS_PARTIAL,
    TAIL_DEFINITION,
    VIEW_FIELDS,
    Layout,
    default_chunk_rows,
    labels_sha256,
    parse_rows,
    version_for,
)
from kdcache.cache.lock import WriteLock
from kdcache.cache.store import (
    Store,
    backend_for,
    check_compressor,
    create_zarr,
    default_compressor,
    ensure_parent,
    is_url,
    open_store,
    path_exists,
    read_attrs,
    remove_tree,
    staging_path,
)
from kdcache.cache.writer import ChunkWriter, Rows
from kdcache.data.datasets import SourceDataset, fingerprint, open_dataset
from kdcache.data.views import (
    AugmentSpec,
    Preprocess,
    identity_views,
    render,
    sample_views,
)
from kdcache.device import autocast, pick_device
from kdcache.dist import init_from_env, shutdown
from kdcache.errors import KDCacheError
from kdcache.models import build_model, checkpoint_arch_args, load_weights
from kdcache.progress import progress


@dataclass(frozen=True)
class DumpConfig:
    """Everything `kdcache dump` takes; the fields that shape the arrays must match on --resume."""

    teacher: str
    weights: str | None = None
    teacher_args: dict = field(default_factory=dict)
    dataset: str = "digits"
    split: str = "train"
    data_root: str | None = None
    download: bool = False
    out: str = "logits.zarr"
    topk: int | None = None
    dtype: str = "float16"
    image_size: int | None = None
    batch_size: int = 256
    num_workers: int = 0
    device: str = "auto"
    chunk_rows: int | None = None
    compressor: str | None = None
    views: int = 1
    augment: str = "none"
    seed: int = 0
    rows: str | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    command: str = ""


RESUME_KEYS = ("teacher", "weights_sha256", "dataset", "split", "fingerprint", "topk", "dtype", "image_size",
               "batch_size", "chunk_rows", "views", "augment", "seed", "rows")


def default_image_size(base_hw: int) -> int:
    """Small datasets (≤ 32 px) run at 32 px; larger images at ImageNet's 224."""
    return 32 if base_hw <= 32 else 224


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


def _prepare_target(cfg: DumpConfig, layout: Layout, attrs: dict, compressor: str) -> None:
    """Create, resume or refuse, by what is already at the output path. Never clobbers unasked."""
    final, stage = cfg.out, staging_path(cfg.out)
    if path_exists(final) and final != stage:  # a finished HDF5 file
        if not cfg.overwrite:
            raise KDCacheError(f"{final} already exists: pass --overwrite to replace it, or choose another --out")
        refuse_foreign(final)
    if path_exists(stage):
        refuse_foreign(stage)
        old = read_attrs(stage)
        if cfg.resume and old.get("status") == STATUS_PARTIAL:
            for key in RESUME_KEYS:
                if old["dump"].get(key) != attrs["dump"].get(key):
                    raise KDCacheError(
                        f"cannot resume {stage}: it was dumped with {key}={old['dump'].get(key)!r}, this command has "
                        f"{attrs['dump'].get(key)!r}; rerun the original command with --resume, or use --overwrite"
                    )
            return
        if not cfg.overwrite:
            what = "is a complete cache" if old.get("status") != STATUS_PARTIAL else "holds a partial dump"
            hint = "--overwrite to replace it" if old.get("status") != STATUS_PARTIAL else \
                "--resume to finish it (same command) or --overwrite to start over"
            raise KDCacheError(f"{stage} already {what}: pass {hint}")
        remove_tree(stage)
    if cfg.overwrite and final != stage and path_exists(final):
        remove_tree(final)
    # HDF5 output is staged uncompressed and compressed once, when it is converted at the end.
    create_zarr(stage, layout, "none" if backend_for(cfg.out) == "hdf5" else compressor, attrs)


def _build_attrs(cfg: DumpConfig, ds: SourceDataset, layout: Layout, teacher_id: dict, pre: Preprocess,
                 aug: AugmentSpec, fp: str, compressor: str, rows: tuple[int, int]) -> dict:
    whole = rows == (0, len(ds))
    span = None if whole else {"start": rows[0], "stop": rows[1],
                               "labels_sha256": labels_sha256(ds.labels[rows[0]:rows[1]])}
    return {
        "format": FORMAT_NAME, "version": version_for(span), "status": STATUS_PARTIAL, **layout.to_attrs(),
        "tail": TAIL_DEFINITION if layout.k else None,
        "compressor": compressor,
        "teacher": {"name": cfg.teacher, "weights": teacher_id, "params": teacher_id.get("params"),
                    "arch_args": teacher_id.get("arch_args", {}),
                    "preprocess": pre.to_json()},
        "dataset": {"spec": ds.info.spec, "split": ds.info.split, "n": len(ds),
                    "num_classes": ds.info.num_classes,
                    "class_names": list(ds.info.class_names), "base_shape": list(ds.info.base_shape),
                    "fingerprint": fp, "labels_sha256": labels_sha256(ds.labels),
                    "labelled": int((ds.labels >= 0).sum())},
        "rows": span,
        "views": {"fields": list(VIEW_FIELDS), "augment": str(aug), "augment_spec": aug.to_json(), "seed": cfg.seed},
        "dump": {"teacher": cfg.teacher, "weights_sha256": teacher_id.get("sha256"), "dataset": ds.info.spec,
                 "split": ds.info.split, "fingerprint": fp, "topk": cfg.topk, "dtype": cfg.dtype,
                 "image_size": pre.image_size, "batch_size": cfg.batch_size, "chunk_rows": layout.chunk_rows,
                 "views": cfg.views, "augment": str(aug), "seed": cfg.seed,
                 "rows": None if whole else list(rows)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool": f"kdcache {__version__}",
        "command": cfg.command,
    }


def _load_teacher(cfg: DumpConfig, num_classes: int, image_size: int,
                  device: torch.device) -> tuple[torch.nn.Module, dict]:
    weights = cfg.weights
    if weights is None:
        raise KDCacheError(
            f"no --weights for teacher {cfg.teacher}: pass --weights PATH (a checkpoint, e.g. from kdtrain) "
            "or --weights DEFAULT for torchvision's published weights"
        )
    args = checkpoint_arch_args(weights) | cfg.teacher_args
    model = build_model(cfg.teacher, num_classes=num_classes, image_size=image_size, **args)
    ident = load_weights(model, weights, cfg.teacher) | {"arch_args": args}
    model.eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, ident


def _targets(logits: torch.Tensor, k: int | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Full logits, or top-k values/indices plus the log-sum-exp of what top-k dropped."""
    if dtype == torch.float16:
        logits = logits.clamp(-65504.0, 65504.0)
    if k is None:
        return {"values": logits.to(dtype)}
    vals, idx = logits.topk(k, dim=-1, sorted=True)
    tail = logits.scatter(-1, idx, float("-inf")).logsumexp(-1)
    return {"values": vals.to(dtype), "indices": idx.to(torch.int32), "tail": tail.float()}


def run_dump(cfg: DumpConfig) -> str:
    """Dump (or resume) a cache as `cfg` says; returns the path of the finished cache."""
    backend = backend_for(cfg.out)
    compressor = cfg.compressor or default_compressor(backend)
    check_compressor(backend, compressor)
    for flag, value, low in (("--views", cfg.views, 1), ("--batch-size", cfg.batch_size, 1),
                             ("--num-workers", cfg.num_workers, 0), ("--chunk-rows", cfg.chunk_rows, 1)):
        if value is not None and value < low:
            raise KDCacheError(f"{flag} must be at least {low}, got {value}")
    aug = AugmentSpec.parse(cfg.augment)
    ds = open_dataset(cfg.dataset, cfg.split, cfg.data_root, cfg.download)
    num_classes = ds.info.num_classes
    pre = Preprocess(cfg.image_size or default_image_size(max(ds.info.base_shape[1:])))
    rows = parse_rows(cfg.rows, len(ds))
    # chunk_rows depends on the dataset, not the range, so range caches chunk like the whole dump would.
    layout = Layout(n=rows[1] - rows[0], n_views=cfg.views, num_classes=num_classes, k=cfg.topk, value_dtype=cfg.dtype,
                    chunk_rows=min(cfg.chunk_rows or default_chunk_rows(cfg.topk or num_classes, cfg.views, cfg.dtype),
                                   len(ds)))
    check_target(cfg.out, [], "dump")
    ensure_parent(cfg.out)
    requested = pick_device(cfg.device)
    d = init_from_env(requested.type == "cuda")
    try:
        device = d.device(requested)
        teacher, ident = _load_teacher(cfg, num_classes, pre.image_size, device)
        attrs = _build_attrs(cfg, ds, layout, ident, pre, aug, fingerprint(ds), compressor, rows)
        with ExitStack() as stack:
            def prepare() -> None:
                if not is_url(cfg.out):  # rank 0 holds the lock for the whole job
                    stack.enter_context(WriteLock(cfg.out))
                _prepare_target(cfg, layout, attrs, compressor)

            d.on_main(prepare)
            store = open_store(staging_path(cfg.out), "r+")
            done = np.asarray(store["done"][...], dtype=bool)
            # Each rank takes every world_size-th unfinished chunk: resumable whatever the earlier world size.
            todo = [c for c in range(layout.n_chunks) if not done[c]][d.rank::d.world_size]
            batches = ChunkBatches(layout, todo, cfg.batch_size, offset=rows[0])
            _run_chunks(replace(cfg, progress=cfg.progress and d.main), teacher, ds, layout, store, batches, pre,
                        aug, device)
            d.barrier()
            d.on_main(lambda: finalize.finalize(store, cfg.out, compressor))
        if staging_path(cfg.out) != cfg.out:
            d.on_main(lambda: remove_tree(staging_path(cfg.out)))
    finally:
        shutdown(d)
    return cfg.out


def _run_chunks(cfg: DumpConfig, teacher: torch.nn.Module, ds: SourceDataset, layout: Layout, store: Store,
                batches: ChunkBatches, pre: Preprocess, aug: AugmentSpec, device: torch.device) -> None:
    loader = DataLoader(ds, batch_sampler=batches, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    value_dtype = getattr(torch, cfg.dtype)
    cuda = device.type == "cuda"
    writer = ChunkWriter(store, layout)
    try:
        with progress(total=batches.rows, desc=f"dump {cfg.teacher}", unit="sample", enable=cfg.progress) as bar, \
                torch.inference_mode():
            for images, labels, idx in loader:
                idx_np = idx.numpy()
                views = sample_views(aug, idx_np, cfg.views, cfg.seed) if cfg.augment != "none" \
                    else identity_views(len(idx_np), cfg.views)
                x = images.to(device, non_blocking=True)
                v_t = torch.from_numpy(views).to(device, non_blocking=True)
                per_view = []
                for v in range(cfg.views):
                    xv = render(x, v_t[:, v], pre)
                    if cuda:
                        xv = xv.contiguous(memory_format=torch.channels_last)
                    with autocast(device):
                        per_view.append(teacher(xv).float())
                out = _targets(torch.stack(per_view, 1), cfg.topk, value_dtype)
                arrays: dict[str, object] = {k: v.to("cpu", non_blocking=cuda) for k, v in out.items()}
                ready = None
                if cuda:
                    event = torch.cuda.Event()
                    event.record()
                    ready = event.synchronize
                arrays["labels"] = labels.numpy().astype(np.int64)
                arrays["views"] = views
                writer.put(Rows(start=int(idx_np[0]) - batches.offset, arrays=arrays, ready=ready))
                bar.update(len(idx_np))
    finally:
        writer.close()

