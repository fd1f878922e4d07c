"""What `kdcache dump` and `kdtrain` take, with every default written once (the CLI reads its defaults from here).

Pure data and number checks, no torch: a bad number is refused before anything heavy is imported or run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from kdcache.errors import KDCacheError

SOFT_LABELS = ("auto", "logits", "samples")
LOSSES = ("auto", "ce", "kd", "hard", "cwtm", "dkpp")
TOPK_MODES = ("tail", "renorm")
OPTIMIZERS = ("adamw", "sgd")
HEAD_MODES = ("cls", "mean")
MAX_EPOCHS = 1_000_000


def default_run_dir(student: str) -> str:
    """Where kdtrain writes a run of `student` unless told (--out), and where `kdcache dump` looks for its weights."""
    return f"runs/{student.replace(':', '_')}"


def default(config: type, name: str) -> object:
    """The default of one field of a config dataclass (for the CLI's option defaults)."""
    f = {f.name: f for f in dataclasses.fields(config)}[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _number(flag: str, value: float | None, low: float | None = None, high: float | None = None,
            strict: bool = False) -> None:
    """A finite number within [low, high] (or > low when `strict`); None means 'not given'."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if strict else value >= low)) and (high is None or value <= high)
    if ok:
        return
    if low is not None and high is not None:
        span = f"between {low:g} and {high:g}"
    elif low is not None:
        span = f"greater than {low:g}" if strict else f"at least {low:g}"
    else:
        span = f"at most {high:g}"
    kind = "a finite number " if isinstance(value, float) else ""
    raise KDCacheError(f"{flag} must be {kind}{span}, got {value}")


def _out(flag: str, value: str) -> None:
    if not str(value).strip():
        raise KDCacheError(f"{flag} is empty: name an output path")


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
    seq_len: int | None = None
    tokenizer: str | None = None
    out: str = "logits.zarr"
    topk: int | None = None
    dtype: str = "auto"
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
    features: tuple[str, ...] = ()  # LAYER[:POOL] of the teacher to cache beside its logits (FitNets hints)
    sample: int | None = None  # M draws per row from the teacher's distribution (sampled soft labels)
    sample_temperature: float = 1.0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    command: str = ""

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise KDCacheError("--resume and --overwrite contradict each other: pass one of them")
        _out("--out", self.out)
        _number("--sample", self.sample, 1, 65535)
        _number("--sample-temperature", self.sample_temperature, 0, strict=True)
        for flag, value, low in (("--views", self.views, 1), ("--batch-size", self.batch_size, 1),
                                 ("--num-workers", self.num_workers, 0), ("--chunk-rows", self.chunk_rows, 1),
                                 ("--topk", self.topk, 1), ("--image-size", self.image_size, 1),
                                 ("--seq-len", self.seq_len, 1)):
            _number(flag, value, low)


@dataclass(frozen=True)
class LossConfig:
    """`loss` over the student's heads: head 0 is the class token, head i the token of teacher i."""

    loss: str = "auto"
    alpha: float = 0.5
    temperature: float = 4.0
    lambdas: tuple[float, ...] | None = None
    taus: tuple[float, ...] | None = None
    topk_mode: str = "tail"
    soft_labels: str = "auto"  # from a cache with both: its logits or its sampled soft labels (auto: logits)

    def __post_init__(self) -> None:
        if self.soft_labels not in SOFT_LABELS:
            raise KDCacheError(f"unknown --soft-labels {self.soft_labels!r}: use one of {', '.join(SOFT_LABELS)}")
        if self.loss not in LOSSES:
            raise KDCacheError(f"unknown --loss {self.loss!r}: use one of {', '.join(LOSSES)}")
        if self.topk_mode not in TOPK_MODES:
            raise KDCacheError(f"unknown --topk-loss {self.topk_mode!r}: use one of {', '.join(TOPK_MODES)}")
        _number("--alpha", self.alpha, 0, 1)
        _number("-T/--temperature", self.temperature, 0, strict=True)
        for t in self.taus or ():
            _number("--taus", t, 0, strict=True)
        for w in self.lambdas or ():
            _number("--lambdas", w, 0)

    def resolve(self, n_teachers: int) -> LossConfig:
        """'auto' is CE without a teacher and KD with one; check the rest fits the number of teachers."""
        loss = self.loss if self.loss != "auto" else ("kd" if n_teachers else "ce")
        if loss != "ce" and n_teachers == 0:
            raise KDCacheError(f"--loss {loss} needs a teacher: pass --cache PATH (dump one with 'kdcache dump')")
        if loss in ("cwtm", "dkpp") and n_teachers != 1:
            raise KDCacheError(f"--loss {loss} (Born-Again) takes exactly one --cache, got {n_teachers}")
        for name, vals in (("--lambdas", self.lambdas), ("--taus", self.taus)):
            if vals is not None and len(vals) != n_teachers:
                raise KDCacheError(f"{name} has {len(vals)} values for {n_teachers} caches: give one per --cache")
        return dataclasses.replace(self, loss=loss)


@dataclass(frozen=True)
class TrainConfig:
    """Everything `kdtrain` takes."""

    student: str = "vit_ti"
    caches: tuple[str, ...] = ()
    test_cache: str | None = None
    dataset: str | None = None
    data_root: str | None = None
    download: bool = False
    seq_len: int | None = None
    tokenizer: str | None = None
    image_size: int | None = None
    student_args: dict = field(default_factory=dict)
    distill_tokens: bool = False
    head_mode: str = "cls"
    loss: LossConfig = LossConfig()
    hint: str | None = None  # a teacher layer cached with --features: add a FitNets hint loss toward it
    hint_student: str | None = None  # the student module whose output is hinted (default: its head's input)
    hint_weight: float = 1.0
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
    out: str | None = None  # None: runs/STUDENT
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    plots: bool = True
    command: str = ""

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise KDCacheError("--resume and --overwrite contradict each other: pass one of them")
        if self.out is not None:
            _out("--out", self.out)
        if self.optimizer not in OPTIMIZERS:
            raise KDCacheError(f"unknown --optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        if self.head_mode not in HEAD_MODES:
            raise KDCacheError(f"unknown --head-mode {self.head_mode!r}: use one of {', '.join(HEAD_MODES)}")
        for flag, value, low, high in (("--epochs", self.epochs, 1, MAX_EPOCHS), ("--batch-size", self.batch_size, 1, None),
                                       ("--num-workers", self.num_workers, 0, None), ("--image-size", self.image_size, 1, None),
                                       ("--seq-len", self.seq_len, 1, None),
                                       ("--weight-decay", self.weight_decay, 0, None), ("--clip", self.clip, 0, None),
                                       ("--mixup", self.mixup, 0, None), ("--warmup-epochs", self.warmup_epochs, 0, MAX_EPOCHS),
                                       ("--cache-ram", self.cache_ram, 0, None)):
            _number(flag, value, low, high)
        _number("--lr", self.lr, 0, strict=True)
        _number("--hint-weight", self.hint_weight, 0)

    @property
    def run_dir(self) -> str:
        return self.out if self.out is not None else default_run_dir(self.student)


@dataclass(frozen=True)
class DemoConfig:
    """`kdcache demo`: sized so that the whole pipeline runs in under two minutes on two CPU cores."""

    out: str = "kdcache-demo"
    teacher: str = "cifar_resnet18"
    teacher_args: tuple[tuple[str, object], ...] = (("width", 16),)
    teacher_epochs: int = 15
    students: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = (
        ("mlp", (("hidden", (256, 256)),)), ("vit_nano", (("patch_size", 4),)))
    student_epochs: int = 15
    image_size: int = 16
    topk: int = 3
    temperature: float = 4.0
    alpha: float = 0.5
    seed: int = 0
    progress: bool = True
