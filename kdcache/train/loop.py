"""Stage 2: train a student from cached soft targets (or from labels alone), with no teacher in memory."""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from kdcache.cache.dump import default_image_size
from kdcache.cache.reader import Cache, open_cache
from kdcache.data.datasets import open_dataset
from kdcache.data.views import AugmentSpec, Preprocess, render
from kdcache.device import amp_dtype, autocast, pick_device
from kdcache.dist import Dist, init_from_env, shutdown
from kdcache.errors import KDCacheError
from kdcache.models import build_model, has_distill_heads, param_count
from kdcache.progress import progress
from kdcache.train.align import check_alignment
from kdcache.train.data import PairedLoader
from kdcache.train.eval import evaluate
from kdcache.train.objective import Objective, mixup_loss
from kdcache.train.run_dir import RunDir


@dataclass(frozen=True)
class TrainConfig:
    """Everything `kdtrain` takes."""

    student: str = "vit_ti"
    caches: tuple[str, ...] = ()
    test_cache: str | None = None
    dataset: str | None = None
    data_root: str | None = None
    image_size: int | None = None
    student_args: dict = field(default_factory=dict)
    distill_tokens: bool = False
    head_mode: str = "cls"
    objective: Objective = Objective()
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float = 1.0
    clip: float = 1.0
    augment: str = "none"
    mixup: float = 0.0
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    cache_ram: int = 1 << 30
    out: str = "runs/kdtrain"
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    plots: bool = True
    command: str = ""


def _open_caches(cfg: TrainConfig, stack: ExitStack) -> list[Cache]:
    caches = [stack.enter_context(open_cache(p, require_complete=False)) for p in cfg.caches]
    for c in caches:
        if c.complete and c.decoded_bytes() <= cfg.cache_ram:  # a partial one is refused by check_alignment
            c.load()
    return caches


def _dataset_spec(cfg: TrainConfig, caches: list[Cache]) -> tuple[str, int]:
    """The dataset and input size to train on: as given, else as the first cache recorded it."""
    if caches:
        a = caches[0].attrs
        spec = cfg.dataset or a["dataset"]["spec"]
        if cfg.dataset is None and (":" in spec and not spec.startswith("imagefolder:")):
            raise KDCacheError(f"the cache was dumped from the dataset factory {spec!r}: kdtrain does not import code "
                               f"named by a cache; pass --dataset {spec} yourself if you trust it")
        return spec, cfg.image_size or a["teacher"]["preprocess"]["image_size"]
    spec = cfg.dataset or "digits"
    return spec, cfg.image_size or 0


def _optimizer(cfg: TrainConfig, model: torch.nn.Module, steps: int) -> tuple[torch.optim.Optimizer, object]:
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr or 1e-3,
                                weight_decay=0.05 if cfg.weight_decay is None else cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr or 0.1, momentum=0.9, nesterov=True,
                              weight_decay=5e-4 if cfg.weight_decay is None else cfg.weight_decay)
    else:
        raise KDCacheError(f"unknown --optimizer {cfg.optimizer!r}: use adamw or sgd")
    warmup = max(1, int(cfg.warmup_epochs * steps / max(cfg.epochs, 1)))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def _student_kwargs(cfg: TrainConfig, n_teachers: int) -> dict:
    """The builder options exactly as used (recorded in checkpoints, so `kdcache dump` rebuilds the same net)."""
    kwargs = dict(cfg.student_args)
    if cfg.distill_tokens:
        if n_teachers == 0:
            raise KDCacheError("--distill-tokens needs at least one --cache (one token per teacher)")
        kwargs["distill_tokens"] = n_teachers
    if cfg.head_mode != "cls":
        kwargs["head_mode"] = cfg.head_mode
    return kwargs


class HeadsView(torch.nn.Module):
    """The student as (B, H, C) logits of all its heads, so DDP wraps exactly the call training makes."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_heads(x) if has_distill_heads(self.model) else self.model(x)[:, None]


@dataclass
class _Step:
    """What one optimisation step needs, built once per run."""

    net: torch.nn.Module
    objective: Objective
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    pre: Preprocess
    device: torch.device
    clip: float
    gen: torch.Generator
    mixup: float = 0.0
    rng: np.random.Generator | None = None


def _train_epoch(s: _Step, loader: PairedLoader, epoch: int, bar_total: int, label: str, show: bool,
                 d: Dist) -> tuple[float, int]:
    """One pass over this rank's batches; returns (sum of loss × batch size, samples) over all ranks."""
    s.net.train()
    loss_sum = torch.zeros((), device=s.device)
    seen = 0
    join = s.net.join() if isinstance(s.net, DDP) else nullcontext()
    with progress(bar_total, label, enable=show) as bar, join:
        for batch in loader.epoch(epoch):
            x = render(batch.images, batch.views, s.pre)
            if s.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            if s.mixup > 0:
                lam = float(s.rng.beta(s.mixup, s.mixup))
                perm = torch.randperm(len(x), generator=s.gen, device=s.gen.device).to(x.device)
                x = lam * x + (1 - lam) * x[perm]
            with autocast(s.device):
                heads = s.net(x).float()
            if s.mixup > 0:
                loss = mixup_loss(s.objective, heads, batch.labels, batch.targets, perm, lam, s.gen)
            else:
                loss = s.objective(heads, batch.labels, batch.targets, s.gen)
            s.opt.zero_grad(set_to_none=True)
            s.scaler.scale(loss).backward()
            if s.clip > 0:
                s.scaler.unscale_(s.opt)
                torch.nn.utils.clip_grad_norm_(s.net.parameters(), s.clip)
            s.scaler.step(s.opt)
            s.scaler.update()
            s.sched.step()
            n = len(batch.labels)
            loss_sum += loss.detach() * n  # stays on the device: no sync per step
            seen += n
            bar.update(n)
    total, count = d.all_sum([float(loss_sum), float(seen)])
    return total, int(count)


def run_train(cfg: TrainConfig) -> dict:
    """Train as `cfg` says (one process, or DDP under torchrun); returns the final metrics (OUT/metrics.json)."""
    torch.manual_seed(cfg.seed)
    requested = pick_device(cfg.device)
    d = init_from_env(requested.type == "cuda")
    try:
        return _run(cfg, d, d.device(requested))
    finally:
        shutdown(d)


def _check_numbers(cfg: TrainConfig) -> None:
    for flag, value, low in (("--epochs", cfg.epochs, 1), ("--batch-size", cfg.batch_size, 1),
                             ("--num-workers", cfg.num_workers, 0)):
        if value < low:
            raise KDCacheError(f"{flag} must be at least {low}, got {value}")
    for flag, value in (("--lr", cfg.lr), ("--weight-decay", cfg.weight_decay), ("--clip", cfg.clip),
                        ("--mixup", cfg.mixup), ("--warmup-epochs", cfg.warmup_epochs)):
        if value is not None and (value < 0 or (flag == "--lr" and value == 0)):
            raise KDCacheError(f"{flag} must be {'positive' if flag == '--lr' else 'non-negative'}, got {value}")


def _run(cfg: TrainConfig, d: Dist, device: torch.device) -> dict:
    _check_numbers(cfg)
    run = RunDir(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, writer=d.main)
    d.barrier()
    with ExitStack() as stack:
        caches = _open_caches(cfg, stack)
        spec, image_size = _dataset_spec(cfg, caches)
        train_ds = open_dataset(spec, "train", cfg.data_root)
        test_ds = open_dataset(spec, "test", cfg.data_root)
        check_alignment(caches, train_ds)
        test_cache = stack.enter_context(open_cache(cfg.test_cache)) if cfg.test_cache else None
        if test_cache is not None:
            check_alignment([test_cache], test_ds)
        pre = Preprocess(image_size or default_image_size(max(train_ds.info.base_shape[1:])))
        objective = cfg.objective.resolve(len(caches))
        student_args = _student_kwargs(cfg, len(caches))
        model = build_model(cfg.student, num_classes=train_ds.info.num_classes, image_size=pre.image_size,
                            **student_args).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        augment = AugmentSpec.parse(cfg.augment) if cfg.augment != "none" else None
        if augment is not None and caches:
            raise KDCacheError("--augment applies only without a cache (a cache's soft targets belong to the views "
                               "it stored): dump the teacher with --views V --augment SPEC and train from that")
        loader = PairedLoader(train_ds, caches, cfg.batch_size, cfg.seed, cfg.num_workers, device,
                              augment=augment, rank=d.rank, world_size=d.world_size)
        opt, sched = _optimizer(cfg, model, cfg.epochs * len(loader))
        scaler = torch.amp.GradScaler(enabled=amp_dtype(device) == torch.float16)
        start, best = run.restore(model, opt, sched, scaler)
        net: torch.nn.Module = HeadsView(model)
        if d.active:
            net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
        step = _Step(net, objective, opt, sched, scaler, pre, device, cfg.clip,
                     torch.Generator(device=device).manual_seed(cfg.seed + d.rank), cfg.mixup,
                     np.random.default_rng([cfg.seed, d.rank]))
        meta = {"student": cfg.student, "student_args": student_args,
                "num_classes": train_ds.info.num_classes, "image_size": pre.image_size,
                "params": param_count(model), "dataset": spec, "world_size": d.world_size,
                "teachers": [{"cache": c.path, **c.attrs["teacher"]} for c in caches]}
        t0 = time.perf_counter()
        for epoch in range(start, cfg.epochs):
            t_epoch = time.perf_counter()
            loss_sum, seen = _train_epoch(step, loader, epoch, len(train_ds) // d.world_size,
                                          f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and d.main, d)
            train_time = time.perf_counter() - t_epoch
            ev = evaluate(model, test_ds, pre, device, test_cache)
            row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "test_top1": ev["top1"],
                   "test_ece": ev["ece"], "test_nll": ev["nll"], "agreement": ev.get("agreement"),
                   "lr": sched.get_last_lr()[0], "train_seconds": train_time,
                   "samples_per_s": seen / max(train_time, 1e-9)}
            best = run.end_epoch(row, ev, model, opt, sched, scaler, meta, best, cfg.plots)
        config = asdict(replace(cfg, objective=objective))
        return run.finish(meta, config, wall_seconds=time.perf_counter() - t0)
