"""Command line: `kdcache` (dump, info, verify, …) and `kdtrain`."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from kdcache.config import (
    HEAD_MODES,
    LOSSES,
    OPTIMIZERS,
    SOFT_LABELS,
    TOPK_MODES,
    DemoConfig,
    DumpConfig,
    LossConfig,
    TrainConfig,
    default,
)
from kdcache.errors import KDCacheError, printable
from kdcache.format.spec import VALUE_DTYPES

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _show_usage_error(self: click.UsageError, file: Any = None) -> None:
    """Click's own input errors, as one line like every other error (exit status stays 2)."""
    cmd = self.ctx.command_path if self.ctx else "kdcache"
    click.echo(f"error: {printable(self.format_message())} (see '{cmd} --help')", err=True)


click.UsageError.show = _show_usage_error  # type: ignore[method-assign]


def _command_line() -> str:
    import os

    return " ".join([os.path.basename(sys.argv[0])] + [shlex.quote(a) for a in sys.argv[1:]])


def _rank0() -> bool:
    """Under torchrun only rank 0 reports; every rank still exits with its own status."""
    import os

    return os.environ.get("RANK", "0") == "0"


INTERRUPTED_DUMP = "interrupted: whatever was written stays marked partial; rerun the same command with --resume"
INTERRUPTED_TRAIN = "interrupted: the last finished epoch is saved in OUT/last.pt; rerun the same command with --resume"
INTERRUPTED = "interrupted: nothing complete was written"


def clean_errors(interrupted: str = INTERRUPTED) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn user-fixable errors into one line on stderr and a non-zero exit, never a traceback."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except KDCacheError as e:
                click.echo(f"error: {printable(e)}", err=True)
                sys.exit(1)
            except KeyboardInterrupt:
                click.echo(interrupted, err=True)
                sys.exit(130)

        return wrapper

    return decorate


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="kdcache")
def kdcache_main() -> None:
    """Offline knowledge distillation: dump teacher logits once, train students from the cache."""


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise KDCacheError(f"{flag} takes comma-separated numbers, e.g. 0.5,0.5; got {text!r}") from None


def _builder_args(pairs: tuple[str, ...], flag: str) -> dict:
    import ast

    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise KDCacheError(f"{flag} takes KEY=VALUE (e.g. hidden=(512,512)); got {p!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            out[key] = value
    return out


def _bytes(text: str) -> int:
    import math

    units = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30,
             "t": 1 << 40, "tib": 1 << 40}
    t = text.strip().lower()
    num = t.rstrip("kmgtib")
    try:
        value = float(num) * units[t[len(num):]]
    except (ValueError, KeyError):
        value = math.nan
    if not math.isfinite(value) or value < 0 or value > 1 << 60:
        raise KDCacheError(f"--cache-ram takes a size like 512MiB, 2GiB or 0; got {text!r}")
    return int(value)


@kdcache_main.command(context_settings=CONTEXT)
@click.option("--teacher", "teachers", required=True, multiple=True, help="torchvision model name, a built-in "
              "(cifar_resnet18, cnn_s, gpt_nano, …), timm:NAME, hf:DIR or package.module:factory. Repeat (with "
              "--out, and --weights/--image-size if given, once per teacher) to dump several teachers in one pass.")
@click.option("--weights", "weights", multiple=True, help="Checkpoint path (state_dict; kdtrain's checkpoints work) "
              "or DEFAULT for published weights [default: kdtrain's run of that name, runs/NAME/best.pt].")
@click.option("--teacher-arg", "teacher_args", multiple=True, help="KEY=VALUE for the teacher's builder "
              "(kdtrain checkpoints record theirs, e.g. width=16).")
@click.option("--dataset", default=default(DumpConfig, "dataset"), show_default=True, help="digits, cifar10, cifar100, "
              "mnist, fashionmnist, imagefolder:PATH, wds:PATTERN (tar shards), hfds:DIR (saved HF dataset) or "
              "package.module:factory.")
@click.option("--split", type=click.Choice(["train", "test"]), default=default(DumpConfig, "split"), show_default=True)
@click.option("--data-root", default=None, help="Where torchvision datasets live.")
@click.option("--download", is_flag=True, help="Download a torchvision dataset that is missing.")
@click.option("--seq-len", type=int, default=None, help="Tokens per sample of text:/tokens:/pydoc datasets.")
@click.option("--tokenizer", default=None, help="text:/pydoc datasets: bytes (default) or hf:DIR.")
@click.option("--out", "outs", multiple=True, help=f"Cache path: .zarr or .h5/.hdf5 [default: "
              f"{default(DumpConfig, 'out')}].")
@click.option("--topk", type=int, default=None, help="Keep the top-k logits (+ tail); omit for full logits.")
@click.option("--dtype", type=click.Choice(["auto", *VALUE_DTYPES]), default=default(DumpConfig, "dtype"),
              show_default=True, help="Values: auto is q8 for per-token top-k caches, else float16.")
@click.option("--image-size", "image_sizes", type=int, multiple=True, help="Teacher input size for images "
              "[default: a timm model's own, else 32 for images ≤ 32 px, else 224]; once for all teachers, or once "
              "per teacher.")
@click.option("--batch-size", type=int, default=default(DumpConfig, "batch_size"), show_default=True)
@click.option("--num-workers", type=int, default=default(DumpConfig, "num_workers"), show_default=True)
@click.option("--device", default=default(DumpConfig, "device"), show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--chunk-rows", type=int, default=None, help="Samples per chunk [default: ~1 MiB of values].")
@click.option("--compressor", default=None, help="Zarr: blosc-zstd (default), blosc-lz4, zstd, gzip, none; "
              "HDF5: gzip (default), lzf, none.")
@click.option("--views", type=int, default=default(DumpConfig, "views"), show_default=True,
              help="Augmented views stored per sample (with --augment).")
@click.option("--augment", default=default(DumpConfig, "augment"), show_default=True, help="View spec, e.g. "
              "'rrc(0.35,1)+flip' or 'translate(0.1)'.")
@click.option("--seed", type=int, default=default(DumpConfig, "seed"), show_default=True, help="Seed of the view sampler.")
@click.option("--rows", default=None, metavar="START:STOP", help="Dump only dataset rows START..STOP-1 (a range "
              "cache); 'kdcache join' makes one cache of the ranges.")
@click.option("--features", multiple=True, metavar="LAYER[:POOL]", help="Also cache a teacher layer's output for "
              "FitNets hints; POOL gap (default), none or HxW. Repeatable.")
@click.option("--sample", type=int, default=None, metavar="M", help="Also (or, without --topk, only) store M "
              "draws per row from the teacher's distribution: sampled soft labels.")
@click.option("--sample-temperature", type=float, default=default(DumpConfig, "sample_temperature"),
              show_default=True, help="The temperature the draws of --sample are taken at.")
@click.option("--resume", is_flag=True, help="Finish a partial cache written by the same command.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache at --out.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@clean_errors(INTERRUPTED_DUMP)
def dump(quiet: bool, teachers: tuple[str, ...], weights: tuple[str, ...], outs: tuple[str, ...],
         image_sizes: tuple[int, ...], teacher_args: tuple[str, ...], features: tuple[str, ...], **kw: Any) -> None:
    """Run teachers once over a dataset and write their logits into caches (one per teacher)."""
    cfgs = [DumpConfig(teacher=t, weights=w, out=o, image_size=size, progress=not quiet, command=_command_line(),
                       teacher_args=_builder_args(teacher_args, "--teacher-arg"), features=features, **kw)
            for t, w, o, size in zip(teachers, *_per_teacher(len(teachers), weights, outs, image_sizes, teacher_args))]
    from kdcache.ops.dump import run_dumps

    for out in run_dumps(cfgs):
        if _rank0():
            click.echo(f"wrote {out}")


def _per_teacher(n: int, weights: tuple, outs: tuple, sizes: tuple, teacher_args: tuple) -> tuple[list, list, list]:
    """--weights, --out and --image-size paired with the teachers in order (weights and sizes may be left out)."""
    if n > 1 and teacher_args:
        raise KDCacheError("--teacher-arg applies to a single --teacher: with several, each teacher takes its options "
                           "from its checkpoint (kdtrain records them), or dump them one at a time")
    if n == 1 and not outs:
        outs = (default(DumpConfig, "out"),)
    for flag, values, optional in (("--out", outs, False), ("--weights", weights, True),
                                   ("--image-size", sizes, True)):
        if len(values) != n and not (optional and not values) and not (flag == "--image-size" and len(values) == 1):
            either = {"--out": "", "--weights": ", or not at all", "--image-size": ", once for all, or not at all"}
            raise KDCacheError(f"{flag} was given {len(values)} time(s) for {n} --teacher: give it once per "
                               f"teacher, in the same order{either[flag]}")
    return list(weights) or [None] * n, list(outs), list(sizes) * (n if len(sizes) == 1 else 1) or [None] * n


@kdcache_main.command(context_settings=CONTEXT)
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--markdown", is_flag=True, help="Print a cache card in Markdown.")
@clean_errors()
def info(path: str, as_json: bool, markdown: bool) -> None:
    """Describe a cache: contents, sizes, teacher quality, identity."""
    from kdcache.io import open_cache
    from kdcache.ops.info import as_markdown, as_text, summary

    with open_cache(path, require_complete=False) as cache:
        s = summary(cache)
    click.echo(json.dumps(s, indent=2) if as_json else as_markdown(s) if markdown else as_text(s))


@click.command(context_settings=CONTEXT)
@click.option("--cache", "caches", multiple=True, help="Teacher cache (.zarr/.h5); repeat for several teachers. "
              "Omit for plain supervised training.")
@click.option("--test-cache", default=None, help="The teacher's cache of the test split, for agreement.")
@click.option("--student", default=default(TrainConfig, "student"), show_default=True, help="vit_ti, vit_s, vit_nano, "
              "mlp, mixer_ti, cifar_resnet18, cifar_resnet10, cnn_s, any torchvision model, or package.module:factory.")
@click.option("--student-arg", "student_args", multiple=True, help="KEY=VALUE passed to the student's builder, "
              "e.g. hidden=(800,800).")
@click.option("--dataset", default=None, help="Override the dataset the cache records (default: the cache's; "
              "digits without a cache).")
@click.option("--data-root", default=None, help="Where torchvision datasets live.")
@click.option("--download", is_flag=True, help="Download a torchvision dataset that is missing.")
@click.option("--seq-len", type=int, default=None, help="Tokens per sample [default: the cache's].")
@click.option("--tokenizer", default=None, help="text:/pydoc datasets: bytes or hf:DIR [default: the cache's].")
@click.option("--image-size", type=int, default=None, help="Student input size for images [default: the "
              "teacher's].")
@click.option("--distill-tokens", is_flag=True, help="ViT/Mixer: one distillation token and head per teacher.")
@click.option("--head-mode", type=click.Choice(HEAD_MODES), default=default(TrainConfig, "head_mode"), show_default=True,
              help="Inference from the class token, or the mean of all heads.")
@click.option("--loss", type=click.Choice(LOSSES), default=default(LossConfig, "loss"), show_default=True,
              help="auto: kd with a cache, else ce.")
@click.option("--alpha", type=float, default=default(LossConfig, "alpha"), show_default=True,
              help="Weight of the label CE term.")
@click.option("-T", "--temperature", type=float, default=default(LossConfig, "temperature"), show_default=True)
@click.option("--lambdas", default=None, help="Per-teacher KL weights λi (CivT Eq. 5), comma-separated.")
@click.option("--taus", default=None, help="Per-teacher temperatures τi, comma-separated.")
@click.option("--topk-loss", type=click.Choice(TOPK_MODES), default=default(LossConfig, "topk_mode"), show_default=True,
              help="Top-k caches: KL over top-k + tail bucket, or renormalised top-k.")
@click.option("--soft-labels", type=click.Choice(SOFT_LABELS), default=default(LossConfig, "soft_labels"),
              show_default=True, help="A cache with logits and sampled soft labels: which to train from (auto: logits).")
@click.option("--hint", default=None, metavar="LAYER", help="FitNets: also regress a student layer onto this teacher "
              "layer, cached by 'kdcache dump --features LAYER'.")
@click.option("--hint-student", default=None, metavar="LAYER", help="The student module whose output is hinted "
              "[default: the input of its last linear layer].")
@click.option("--hint-weight", type=float, default=default(TrainConfig, "hint_weight"), show_default=True,
              help="Weight of the hint loss.")
@click.option("--epochs", type=int, default=default(TrainConfig, "epochs"), show_default=True)
@click.option("--batch-size", type=int, default=default(TrainConfig, "batch_size"), show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=default(TrainConfig, "optimizer"), show_default=True)
@click.option("--lr", type=float, default=None, help="[default: 1e-3 adamw, 0.1 sgd]")
@click.option("--weight-decay", type=float, default=None, help="[default: 0.05 adamw, 5e-4 sgd]")
@click.option("--warmup-epochs", type=float, default=default(TrainConfig, "warmup_epochs"), show_default=True)
@click.option("--clip", type=float, default=default(TrainConfig, "clip"), show_default=True,
              help="Gradient-norm clip; 0 = off.")
@click.option("--augment", default=default(TrainConfig, "augment"), show_default=True, help="Augmentation of images when "
              "no multi-view cache supplies views, e.g. 'translate(0.1)'.")
@click.option("--mixup", type=float, default=default(TrainConfig, "mixup"), show_default=True, help="Mixup Beta(a, a) on "
              "the student's input; soft targets are mixed with the same λ (0 = off).")
@click.option("--seed", type=int, default=default(TrainConfig, "seed"), show_default=True)
@click.option("--device", default=default(TrainConfig, "device"), show_default=True)
@click.option("--num-workers", type=int, default=default(TrainConfig, "num_workers"), show_default=True)
@click.option("--cache-ram", default="1GiB", show_default=True, help="Load a cache whole when it decodes to "
              "at most this; stream it otherwise (0 = always stream).")
@click.option("--out", default=None, help="Run directory [default: runs/STUDENT].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from last.pt.")
@click.option("--overwrite", is_flag=True, help="Replace the run in --out.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--no-plots", is_flag=True)
@clean_errors(INTERRUPTED_TRAIN)
def kdtrain_main(caches: tuple[str, ...], student_args: tuple[str, ...], loss: str, alpha: float,
                 temperature: float, lambdas: str | None, taus: str | None, topk_loss: str, soft_labels: str,
                 cache_ram: str, quiet: bool, no_plots: bool, **kw: Any) -> None:
    """Train a student from cached teacher logits (no teacher in memory), or from labels alone."""
    loss_cfg = LossConfig(loss, alpha, temperature, _floats(lambdas, "--lambdas"), _floats(taus, "--taus"), topk_loss,
                          soft_labels)
    cfg = TrainConfig(caches=caches, student_args=_builder_args(student_args, "--student-arg"), loss=loss_cfg,
                      cache_ram=_bytes(cache_ram), progress=not quiet, plots=not no_plots, command=_command_line(),
                      **kw)
    from kdcache.train.recipe import run_train

    r = run_train(cfg)
    f = r["final"]
    if not _rank0():
        return
    click.echo(f"{cfg.student}: test top-1 {100 * f['test_top1']:.2f}% (best {100 * r['best']['test_top1']:.2f}% "
               f"at epoch {r['best']['epoch']}), ECE {f['test_ece']:.4f}, {r['wall_seconds']:.1f} s; "
               f"wrote {cfg.run_dir}/metrics.json")


@kdcache_main.command(context_settings=CONTEXT)
@click.option("--out", default=DemoConfig.out, show_default=True, help="Directory for the demo's runs and caches.")
@click.option("--teacher-epochs", type=click.IntRange(1), default=DemoConfig.teacher_epochs, show_default=True)
@click.option("--student-epochs", type=click.IntRange(1), default=DemoConfig.student_epochs, show_default=True)
@click.option("--seed", type=int, default=DemoConfig.seed, show_default=True)
@click.option("--quiet", is_flag=True)
@clean_errors()
def demo(out: str, teacher_epochs: int, student_epochs: int, seed: int, quiet: bool) -> None:
    """The whole pipeline on the embedded digits data: teacher → dump → students, then a results table."""
    import time

    from kdcache.demo import format_table, run_demo

    t0 = time.perf_counter()
    rows = run_demo(DemoConfig(out=out, teacher_epochs=teacher_epochs, student_epochs=student_epochs, seed=seed,
                               progress=not quiet))
    click.echo(format_table(rows))
    click.echo(f"total {time.perf_counter() - t0:.0f} s; runs, caches and plots in {out}/")


@kdcache_main.command(context_settings=CONTEXT)
@click.argument("path")
@clean_errors()
def verify(path: str) -> None:
    """Check status, done map, per-chunk checksums, shapes, dtypes, NaN/Inf, index ranges and attributes."""
    from kdcache.ops.verify import verify as run_verify

    problems, checked = run_verify(path)
    if problems:
        for p in problems:
            click.echo(f"{printable(path)}: {printable(p)}", err=True)
        click.echo(f"error: {printable(path)} failed verification ({len(problems)} problem(s))", err=True)
        sys.exit(1)
    click.echo(f"ok: {path}: {checked['n']} samples, {checked['chunks']} chunks × {checked['views']} view(s) verified")


@kdcache_main.command(context_settings=CONTEXT)
@click.argument("src")
@click.argument("dest")
@click.option("--compressor", default=None, help="Compressor of the output (see dump).")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache at DEST (never anything else).")
@clean_errors()
def convert(src: str, dest: str, compressor: str | None, overwrite: bool) -> None:
    """Copy a cache to another backend (.zarr ↔ .h5) or compressor, losslessly; every array is checked after."""
    from kdcache.ops.convert import convert as run

    run(src, dest, compressor, overwrite)
    click.echo(f"wrote {dest} (verified equal to {src})")


@kdcache_main.command(context_settings=CONTEXT)
@click.argument("src")
@click.argument("dest")
@click.option("--overwrite", is_flag=True, help="Replace an existing packed cache at DEST (never anything else).")
@clean_errors()
def pack(src: str, dest: str, overwrite: bool) -> None:
    """Pack a cache into one .zip file that zarr reads in place (locally or over HTTP)."""
    from kdcache.ops.convert import pack as run

    run(src, dest, overwrite)
    click.echo(f"wrote {dest} (verified equal to {src})")


@kdcache_main.command(context_settings=CONTEXT)
@click.argument("caches", nargs=-1, required=True)
@click.option("--out", required=True, help="The ensemble cache (.zarr or .h5).")
@click.option("--mode", type=click.Choice(["mean-prob", "mean-logit"]), default="mean-prob", show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="mean-prob averages softmax(z/T); the stored logits reproduce it exactly at this T.")
@click.option("--weights", default=None, help="Member weights, comma-separated (normalised to sum 1).")
@click.option("--overwrite", is_flag=True)
@clean_errors()
def merge(caches: tuple[str, ...], out: str, mode: str, temperature: float, weights: str | None,
          overwrite: bool) -> None:
    """Merge several teachers' caches of one dataset into an ensemble cache."""
    w = _floats(weights, "--weights")
    from kdcache.ops.merge import merge as run

    run(list(caches), out, mode, temperature, list(w) if w else None, overwrite, _command_line())
    click.echo(f"wrote {out}")


@kdcache_main.command(context_settings=CONTEXT)
@click.argument("caches", nargs=-1, required=True)
@click.option("--out", required=True, help="The joined cache (.zarr or .h5).")
@click.option("--overwrite", is_flag=True)
@clean_errors()
def join(caches: tuple[str, ...], out: str, overwrite: bool) -> None:
    """Join caches of one dump over disjoint --rows ranges into one cache."""
    from kdcache.ops.join import join as run

    start, stop, n = run(list(caches), out, overwrite, _command_line())
    span = "all of the dataset" if (start, stop) == (0, n) else f"a range cache; the dataset has {n}"
    click.echo(f"wrote {out} (rows {start}:{stop}, {span})")


kdcache_main.add_command(kdtrain_main, "train")
