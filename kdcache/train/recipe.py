"""Stage 2: train a student from cached soft targets (or from labels alone), with no teacher in memory.

A flat recipe to read top to bottom and fork: `run_train` opens the caches and datasets, checks that they align,
builds the student, optimiser and loader, then runs epochs of `Trainer.train_epoch` and evaluation into a run
directory. Where soft targets come from is one hook, `targets`: by default the caches' stored answers; experiments
and benchmarks pass another source (e.g. a teacher run online on the same inputs) and use this same loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from kdcache.config import TrainConfig
from kdcache.data.datasets import is_factory, open_dataset
from kdcache.data.hftok import check_model_vocab
from kdcache.data.render import ModelInput, image_only, model_input
from kdcache.data.sources import SourceDataset
from kdcache.data.views import AugmentSpec, identity_views
from kdcache.device import amp_dtype, autocast, pick_device, to_model_layout
from kdcache.dist import Dist, init_from_env, shutdown
from kdcache.errors import KDCacheError
from kdcache.io.reader import Cache, open_cache
from kdcache.models import HeadsView, build_model, model_preprocess, param_count
from kdcache.models.taps import tap
from kdcache.progress import progress, say
from kdcache.train.align import check_alignment
from kdcache.train.batches import Batch, PairedLoader, mixing_window
from kdcache.train.eval import evaluate
from kdcache.train.losses import SoftTarget
from kdcache.train.hints import HintLoss, probe_shape, student_layer
from kdcache.train.objective import Objective, mixup_loss
from kdcache.train.run_dir import RunDir


class Targets:
    """Where a step's soft targets come from: `n_teachers` of them per batch. This default takes the caches' stored
    answers for the batch; subclass (or duck-type) it to compute targets another way from the model input `x`."""

    def __init__(self, n_teachers: int) -> None:
        self.n_teachers = n_teachers

    def __call__(self, batch: Batch, x: Tensor) -> list[SoftTarget]:
        return batch.targets


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module,
                    steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (or SGD with Nesterov momentum) with linear warmup, then cosine decay to 0 over `steps`."""
    if cfg.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr or 1e-3, weight_decay=0.05 if cfg.weight_decay is None else cfg.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr or 0.1, momentum=0.9, nesterov=True,
                              weight_decay=5e-4 if cfg.weight_decay is None else cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_epochs * steps / max(cfg.epochs, 1)))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


@dataclass
class Trainer:
    """One optimisation step and one epoch of them, built once per run."""

    net: torch.nn.Module            # HeadsView(student), DDP-wrapped under torchrun
    objective: Objective
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    input: ModelInput
    device: torch.device
    clip: float
    gen: torch.Generator
    targets: Callable[[Batch, Tensor], list[SoftTarget]]
    mixup: float = 0.0
    rng: np.random.Generator | None = None
    hint: HintLoss | None = None

    def step(self, batch: Batch) -> Tensor:
        """Render the batch, compute the loss against its soft targets, and take one optimiser step."""
        x = to_model_layout(self.input(batch.samples, batch.views))
        targets = self.targets(batch, x)
        if self.mixup > 0:
            lam = float(self.rng.beta(self.mixup, self.mixup))
            perm = torch.randperm(len(x), generator=self.gen, device=self.gen.device).to(x.device)
            x = lam * x + (1 - lam) * x[perm]
        with autocast(self.device):
            heads = self.net(x).float()
        if self.mixup > 0:
            loss = mixup_loss(self.objective, heads, batch.labels, targets, perm, lam, self.gen)
        else:
            loss = self.objective(heads, batch.labels, targets, self.gen)
        if self.hint is not None:
            loss = loss + self.hint(batch.labels, targets[0])
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return loss.detach()

    def train_epoch(self, loader: PairedLoader, epoch: int, label: str, show: bool, d: Dist) -> tuple[float, int]:
        """One pass over this rank's batches; returns (sum of loss × batch size, samples) over all ranks."""
        self.net.train()
        loss_sum = torch.zeros((), device=self.device)
        seen = 0
        join = self.net.join() if isinstance(self.net, DDP) else nullcontext()
        with progress(len(loader.ds) // d.world_size, label, enable=show) as bar, join:
            for batch in loader.epoch(epoch):
                n = len(batch.labels)
                loss_sum += self.step(batch) * n  # stays on the device: no sync per step
                seen += n
                bar.update(n)
        total, count = d.all_sum([float(loss_sum), float(seen)])
        if not math.isfinite(total):
            raise KDCacheError(f"the training loss became {total} in epoch {epoch + 1}: lower --lr, or check the "
                               "data and caches for NaN/Inf ('kdcache verify')")
        return total, int(count)


def epoch_line(row: dict, epochs: int) -> str:
    """One epoch's results as a log line."""
    extra = "" if row.get("agreement") is None else f", agrees w/ teacher {100 * row['agreement']:.1f}%"
    ece = "" if row.get("test_ece") is None else f", ECE {row['test_ece']:.4f}"
    ppl = "" if row.get("test_ppl") is None else f", perplexity {row['test_ppl']:.3f}"
    return (f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f}, test top-1 {100 * row['test_top1']:.2f}%"
            f"{ppl}{ece}{extra}, {row['samples_per_s']:.0f} samples/s, {row['train_seconds']:.1f} s")


def _open_caches(cfg: TrainConfig, stack: ExitStack) -> list[Cache]:
    caches = [stack.enter_context(open_cache(p)) for p in cfg.caches]  # a partial cache is refused here
    for c in caches:
        if c.decoded_bytes() <= cfg.cache_ram:
            c.load()
    return caches


@dataclass(frozen=True)
class DataChoice:
    """The dataset to train on and how to open it: as given, else as the first cache recorded it."""

    spec: str
    image_size: int | None
    seq_len: int | None
    tokenizer: str | None
    crop_pct: float | None = None  # the first teacher's crop (timm's crop_pct): the student sees what it saw

    def open(self, split: str, data_root: str | None, download: bool = False) -> SourceDataset:
        return open_dataset(self.spec, split, data_root, download, self.seq_len, self.tokenizer)


def _dataset_spec(cfg: TrainConfig, caches: list[Cache]) -> DataChoice:
    if not caches:
        return DataChoice(cfg.dataset or "digits", cfg.image_size, cfg.seq_len, cfg.tokenizer)
    a = caches[0].attrs
    spec = cfg.dataset or a["dataset"]["spec"]
    if cfg.dataset is None and is_factory(spec):
        raise KDCacheError(f"the cache was dumped from the dataset factory {spec!r}: kdtrain does not import code "
                           f"named by a cache; pass --dataset {spec} yourself if you trust it")
    recorded = a["dataset"]
    pre = a["teacher"]["preprocess"]
    return DataChoice(spec, cfg.image_size or pre.get("image_size"), cfg.seq_len or recorded.get("seq_len"),
                      cfg.tokenizer or recorded.get("tokenizer"), pre.get("crop_pct"))


def _check_soft_labels(cfg: TrainConfig, caches: list[Cache]) -> None:
    """Sampled soft labels estimate the teacher at the temperature they were drawn at: train at that T."""
    for c in caches:
        sampled = c.layout.samples and (cfg.loss.soft_labels == "samples" or not c.layout.logits)
        if cfg.loss.soft_labels == "samples" and not c.layout.samples:
            raise KDCacheError(f"{c.path} holds no sampled soft labels: dump the teacher with --sample M, or drop "
                               "--soft-labels samples")
        if sampled and cfg.loss.loss in ("kd", "auto"):
            taus = cfg.loss.taus or (cfg.loss.temperature,)
            if any(abs(t - c.sample_temperature) > 1e-9 for t in taus):
                raise KDCacheError(f"the soft labels of {c.path} were drawn at temperature {c.sample_temperature}: "
                                   f"train with -T {c.sample_temperature} (and --taus at it, if given): an unbiased "
                                   "estimate holds only there")


def _build_hint(cfg: TrainConfig, model: torch.nn.Module, caches: list[Cache], targets: Targets, ds: SourceDataset,
                pre: ModelInput, device: torch.device, stack: ExitStack) -> HintLoss | None:
    """The FitNets hint toward the teacher feature --hint names (from the cache, or the targets hook's `features`)."""
    if cfg.hint is None:
        return None
    if cfg.mixup > 0:
        raise KDCacheError("--hint with --mixup: a mixed input has no cached teacher feature; use one of them")
    specs = (caches[0].attrs.get("features") if caches else getattr(targets, "features", None)) or []
    teacher = next((f for f in specs if f["layer"] == cfg.hint), None)
    if teacher is None:
        have = ", ".join(f["layer"] for f in specs) or "none"
        raise KDCacheError(f"--hint {cfg.hint}: the teacher's cache holds no feature of that layer (it holds "
                           f"{have}); dump it with --features {cfg.hint}")
    layer, use_input = student_layer(model, cfg.hint_student)
    seen = stack.enter_context(tap(model, [layer], "student", inputs=use_input))
    sample = to_model_layout(pre(ds[0][0][None].to(device), torch.from_numpy(identity_views(1)[:, 0]).to(device)))
    shape = probe_shape(model, seen, layer, sample, teacher, ds.info.per_token)
    return HintLoss(layer, teacher, shape, ds.info.per_token, cfg.hint_weight, seen).to(device)


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


def _augment(cfg: TrainConfig, ds: SourceDataset, caches: list[Cache]) -> AugmentSpec | None:
    """Views to draw without a cache; refused where they cannot apply (caches bring their own, tensors have none)."""
    if not ds.info.is_image:
        for flag, on in (("--augment", cfg.augment != "none"),
                         ("--mixup", cfg.mixup > 0 and ds.info.dtype.startswith(("int", "uint", "bool")))):
            if on:
                raise image_only(flag, ds.info)
    if cfg.augment == "none":
        return None
    if caches:
        raise KDCacheError("--augment applies only without a cache (a cache's soft targets belong to the views "
                           "it stored): dump the teacher with --views V --augment SPEC and train from that")
    return AugmentSpec.parse(cfg.augment)


def run_train(cfg: TrainConfig, targets: Targets | None = None) -> dict:
    """Train as `cfg` says (one process, or DDP under torchrun); returns the final metrics (OUT/metrics.json).

    `targets` replaces the caches as the source of soft targets (then `cfg.caches` must be empty).
    """
    if targets is not None and cfg.caches:
        raise ValueError("pass either caches in the config or a targets hook, not both")
    torch.manual_seed(cfg.seed)
    requested = pick_device(cfg.device)
    d = init_from_env(requested.type == "cuda")
    try:
        return _run(cfg, d, d.device(requested), targets)
    finally:
        shutdown(d)


def _run(cfg: TrainConfig, d: Dist, device: torch.device, targets: Targets | None) -> dict:
    run = RunDir(cfg.run_dir, resume=cfg.resume, overwrite=cfg.overwrite, writer=d.main)
    d.barrier()
    with ExitStack() as stack:
        caches = _open_caches(cfg, stack)
        targets = targets or Targets(len(caches))
        data = _dataset_spec(cfg, caches)
        train_ds, test_ds = (data.open(s, cfg.data_root, cfg.download) for s in ("train", "test"))
        check_alignment(caches, train_ds)
        test_cache = stack.enter_context(open_cache(cfg.test_cache)) if cfg.test_cache else None
        if test_cache is not None:
            check_alignment([test_cache], test_ds)
        pre = model_input(train_ds.info, data.image_size,
                          model_preprocess(cfg.student, data.image_size, data.crop_pct))
        objective = Objective(cfg.loss.resolve(targets.n_teachers))
        student_args = _student_kwargs(cfg, targets.n_teachers)
        check_model_vocab(cfg.student, train_ds.info.vocab)
        model = build_model(cfg.student, train_ds.info.num_classes, pre.input_shape, student_args,
                            **train_ds.info.model_inputs).to(device)
        if device.type == "cuda" and len(pre.input_shape) == 3:
            model = model.to(memory_format=torch.channels_last)
        _check_soft_labels(cfg, caches)
        hint = _build_hint(cfg, model, caches, targets, train_ds, pre, device, stack)
        loader = PairedLoader(train_ds, caches, cfg.batch_size, cfg.seed, cfg.num_workers, device,
                              augment=_augment(cfg, train_ds, caches), window=mixing_window(caches, cfg.batch_size),
                              rank=d.rank, world_size=d.world_size, soft_labels=cfg.loss.soft_labels)
        trained = torch.nn.ModuleList([model, *([hint] if hint is not None else [])])
        opt, sched = build_optimizer(cfg, trained, cfg.epochs * len(loader))
        scaler = torch.amp.GradScaler(enabled=amp_dtype(device) == torch.float16)
        meta = {"student": cfg.student, "student_args": student_args,
                "num_classes": train_ds.info.num_classes, "image_size": getattr(pre, "image_size", None),
                "preprocess": pre.to_json(), "input": train_ds.info.input_json(), "params": param_count(model),
                "dataset": data.spec,
                "world_size": d.world_size, "caches": [c.path for c in caches],
                "teachers": [{"cache": c.path, **c.attrs["teacher"]} for c in caches],
                "hint": None if hint is None else [cfg.hint, hint.student_layer, cfg.hint_weight]}
        start, best = run.restore(model, opt, sched, scaler, meta, hint)
        net: torch.nn.Module = HeadsView(model)
        if d.active:
            net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
        trainer = Trainer(net, objective, opt, sched, scaler, pre, device, cfg.clip,
                          torch.Generator(device=device).manual_seed(cfg.seed + d.rank), targets, cfg.mixup,
                          np.random.default_rng([cfg.seed, d.rank]), hint)
        t0 = time.perf_counter()
        for epoch in range(start, cfg.epochs):
            t_epoch = time.perf_counter()
            loss_sum, seen = trainer.train_epoch(loader, epoch, f"epoch {epoch + 1}/{cfg.epochs}",
                                                 cfg.progress and d.main, d)
            train_time = time.perf_counter() - t_epoch
            ev = evaluate(model, test_ds, pre, device, test_cache)
            row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "test_top1": ev["top1"],
                   "test_ece": ev["ece"], "test_nll": ev["nll"], "test_ppl": ev.get("perplexity"),
                   "agreement": ev.get("agreement"), "lr": sched.get_last_lr()[0], "train_seconds": train_time,
                   "samples_per_s": seen / max(train_time, 1e-9)}
            if "top1_by_group" in ev:
                row["top1_by_group"] = ev["top1_by_group"]
            best = run.end_epoch(row, ev, model, opt, sched, scaler, meta, best, cfg.plots, hint)
            say(epoch_line(row, cfg.epochs), cfg.progress and d.main)
        config = asdict(replace(cfg, loss=objective.cfg))
        return run.finish(meta, config, wall_seconds=time.perf_counter() - t0)
