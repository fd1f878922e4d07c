"""Command line: `kdcache` (dump, info, verify, …) and `kdtrain`."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from kdcache.errors import KDCacheError


def _show_usage_error(self: click.UsageError, file: Any = None) -> None:
    """Click's own input errors, as one line like every other error (exit status stays 2)."""
    cmd = self.ctx.command_path if self.ctx else "kdcache"
    click.echo(f"error: {self.format_message()} (see '{cmd} --help')", err=True)


click.UsageError.show = _show_usage_error  # type: ignore[method-assign]


def _command_line() -> str:
    import os

    return " ".join([os.path.basename(sys.argv[0])] + [shlex.quote(a) for a in sys.argv[1:]])


def _rank0() -> bool:
    """Under torchrun only rank 0 reports; every rank still exits with its own status."""
    import os

    return os.environ.get("RANK", "0") == "0"


def clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user-fixable errors into one line on stderr and a non-zero exit, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KDCacheError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: whatever was written stays marked partial; rerun with --resume", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kdcache")
def kdcache_main() -> None:
    """Offline knowledge distillation: dump teacher logits once, train students from the cache."""


@kdcache_main.command()
@click.option("--teacher", required=True, help="torchvision model name, a built-in (cifar_resnet18, cnn_s, "
              "rednet26_s, …) or package.module:factory.")
@click.option("--weights", default=None, help="Checkpoint path (state_dict; kdtrain's checkpoints work) or DEFAULT "
              "for torchvision's published weights.")
@click.option("--teacher-arg", "teacher_args", multiple=True, help="KEY=VALUE for the teacher's builder "
              "(kdtrain checkpoints record theirs, e.g. width=16).")
@click.option("--dataset", default="digits", show_default=True, help="digits, cifar10, cifar100, mnist, "
              "fashionmnist, imagefolder:PATH or package.module:factory.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--data-root", default=None, help="Where torchvision datasets live.")
@click.option("--download", is_flag=True, help="Download a torchvision dataset that is missing.")
@click.option("--out", default="logits.zarr", show_default=True, help="Cache path: .zarr or .h5/.hdf5.")
@click.option("--topk", type=int, default=None, help="Keep the top-k logits (+ tail); omit for full logits.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--image-size", type=int, default=None, help="Teacher input size [default: 32 for images ≤ 32 px, "
              "else 224].")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--num-workers", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--chunk-rows", type=int, default=None, help="Samples per chunk [default: ~1 MiB of values].")
@click.option("--compressor", default=None, help="Zarr: blosc-zstd (default), blosc-lz4, zstd, gzip, none; "
              "HDF5: gzip (default), lzf, none.")
@click.option("--views", type=int, default=1, show_default=True, help="Augmented views stored per sample.")
@click.option("--augment", default="none", show_default=True, help="View spec, e.g. 'rrc(0.35,1)+flip' or "
              "'translate(0.1)'.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the view sampler.")
@click.option("--rows", default=None, metavar="START:STOP", help="Dump only dataset rows START..STOP-1 (a range "
              "cache); 'kdcache join' makes one cache of the ranges.")
@click.option("--resume", is_flag=True, help="Finish a partial cache written by the same command.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache at --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@clean_errors
def dump(quiet: bool, **kw: Any) -> None:
    """Run a teacher once over a dataset and write its logits into a cache."""
    from kdcache.cache.dump import DumpConfig, run_dump

    if kw["resume"] and kw["overwrite"]:
        raise KDCacheError("--resume and --overwrite contradict each other: pass one of them")
    kw["teacher_args"] = _builder_args(kw["teacher_args"], "--teacher-arg")
    out = run_dump(DumpConfig(progress=not quiet, command=_command_line(), **kw))
    if _rank0():
        click.echo(f"wrote {out}")


@kdcache_main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--markdown", is_flag=True, help="Print a cache card in Markdown.")
@clean_errors
def info(path: str, as_json: bool, markdown: bool) -> None:
    """Describe a cache: contents, sizes, teacher quality, identity."""
    from kdcache.cache import open_cache
    from kdcache.cache.info import as_markdown, as_text, summary

    with open_cache(path, require_complete=False) as cache:
        s = summary(cache)
    click.echo(json.dumps(s, indent=2) if as_json else as_markdown(s) if markdown else as_text(s))


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise KDCacheError(f"{flag} takes comma-separated numbers, e.g. 0.5,0.5; got {text!r}") from None


def _builder_args(pairs: tuple[str, ...], flag: str = "--student-arg") -> dict:
    import ast

    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise KDCacheError(f"{flag} takes KEY=VALUE (e.g. hidden=(512,512)); got {p!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _bytes(text: str) -> int:
    units = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}
    t = text.strip().lower()
    num = t.rstrip("kmgib")
    try:
        return int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise KDCacheError(f"--cache-ram takes a size like 512MiB, 2GiB or 0; got {text!r}") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--cache", "caches", multiple=True, help="Teacher cache (.zarr/.h5); repeat for several teachers. "
              "Omit for plain supervised training.")
@click.option("--test-cache", default=None, help="The teacher's cache of the test split, for agreement.")
@click.option("--student", default="vit_ti", show_default=True, help="vit_ti, vit_s, vit_nano, mlp, mixer_ti, "
              "cifar_resnet18, cifar_resnet10, cnn_s, any torchvision model, or package.module:factory.")
@click.option("--student-arg", "student_args", multiple=True, help="KEY=VALUE passed to the student's builder, "
              "e.g. hidden=(800,800).")
@click.option("--dataset", default=None, help="Override the dataset the cache records (default: the cache's; "
              "digits without a cache).")
@click.option("--data-root", default=None)
@click.option("--image-size", type=int, default=None, help="Student input size [default: the teacher's].")
@click.option("--distill-tokens", is_flag=True, help="ViT/Mixer: one distillation token and head per teacher.")
@click.option("--head-mode", type=click.Choice(["cls", "mean"]), default="cls", show_default=True,
              help="Inference from the class token, or the mean of all heads.")
@click.option("--loss", default="auto", show_default=True, help="auto (kd with a cache, else ce), ce, kd, hard, "
              "cwtm, dkpp.")
@click.option("--alpha", type=float, default=0.5, show_default=True, help="Weight of the label CE term.")
@click.option("-T", "--temperature", type=float, default=4.0, show_default=True)
@click.option("--lambdas", default=None, help="Per-teacher KL weights λi (CivT Eq. 5), comma-separated.")
@click.option("--taus", default=None, help="Per-teacher temperatures τi, comma-separated.")
@click.option("--topk-loss", type=click.Choice(["tail", "renorm"]), default="tail", show_default=True,
              help="Top-k caches: KL over top-k + tail bucket, or renormalised top-k.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--lr", type=float, default=None, help="[default: 1e-3 adamw, 0.1 sgd]")
@click.option("--weight-decay", type=float, default=None, help="[default: 0.05 adamw, 5e-4 sgd]")
@click.option("--warmup-epochs", type=float, default=1.0, show_default=True)
@click.option("--clip", type=float, default=1.0, show_default=True, help="Gradient-norm clip; 0 = off.")
@click.option("--augment", default="none", show_default=True, help="Augmentation when no multi-view cache "
              "supplies views, e.g. 'translate(0.1)'.")
@click.option("--mixup", type=float, default=0.0, show_default=True, help="Mixup Beta(a, a) on the student's "
              "input; soft targets are mixed with the same λ (0 = off).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--num-workers", type=int, default=0, show_default=True)
@click.option("--cache-ram", default="1GiB", show_default=True, help="Load a cache whole when it decodes to "
              "at most this; stream it otherwise (0 = always stream).")
@click.option("--out", default=None, help="Run directory [default: runs/STUDENT].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from last.pt.")
@click.option("--overwrite", is_flag=True, help="Replace the run in --out.")
@click.option("--quiet", is_flag=True)
@click.option("--no-plots", is_flag=True)
@clean_errors
def kdtrain_main(caches: tuple[str, ...], student_args: tuple[str, ...], loss: str, alpha: float,
                 temperature: float, lambdas: str | None, taus: str | None, topk_loss: str, cache_ram: str,
                 out: str | None, quiet: bool, no_plots: bool, **kw: Any) -> None:
    """Train a student from cached teacher logits (no teacher in memory), or from labels alone."""
    from kdcache.train.loop import TrainConfig, run_train
    from kdcache.train.objective import Objective

    objective = Objective(loss, alpha, temperature, _floats(lambdas, "--lambdas"), _floats(taus, "--taus"),
                          topk_loss)
    cfg = TrainConfig(caches=caches, student_args=_builder_args(student_args), objective=objective,
                      cache_ram=_bytes(cache_ram), out=out or f"runs/{kw['student'].replace(':', '_')}",
                      progress=not quiet, plots=not no_plots, command=_command_line(), **kw)
    r = run_train(cfg)
    f = r["final"]
    if not _rank0():
        return
    click.echo(f"{cfg.student}: test top-1 {100 * f['test_top1']:.2f}% (best {100 * r['best']['test_top1']:.2f}% "
               f"at epoch {r['best']['epoch']}), ECE {f['test_ece']:.4f}, {r['wall_seconds']:.1f} s; "
               f"wrote {cfg.out}/metrics.json")


@kdcache_main.command()
@click.option("--out", default="kdcache-demo", show_default=True, help="Directory for the demo's runs and caches.")
@click.option("--teacher-epochs", type=int, default=15, show_default=True)
@click.option("--student-epochs", type=int, default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True)
@clean_errors
def demo(out: str, teacher_epochs: int, student_epochs: int, seed: int, quiet: bool) -> None:
    """The whole pipeline on the embedded digits data: teacher → dump → students, then a results table."""
    import time

    from kdcache.demo import DemoConfig, format_table, run_demo

    for flag, value, low in (("--teacher-epochs", teacher_epochs, 1), ("--student-epochs", student_epochs, 1)):
        if value < low:
            raise KDCacheError(f"{flag} must be at least {low}, got {value}")
    t0 = time.perf_counter()
    rows = run_demo(DemoConfig(out=out, teacher_epochs=teacher_epochs, student_epochs=student_epochs, seed=seed,
                               progress=not quiet))
    click.echo(format_table(rows))
    click.echo(f"total {time.perf_counter() - t0:.0f} s; runs, caches and plots in {out}/")


@kdcache_main.command()
@click.argument("path")
@clean_errors
def verify(path: str) -> None:
    """Check status, done map, per-chunk checksums, shapes, dtypes, NaN/Inf, index ranges and attributes."""
    from kdcache.cache.verify import verify as run_verify

    problems, checked = run_verify(path)
    if problems:
        for p in problems:
            click.echo(f"{path}: {p}", err=True)
        click.echo(f"error: {path} failed verification ({len(problems)} problem(s))", err=True)
        sys.exit(1)
    click.echo(f"ok: {path}: {checked['n']} samples, {checked['chunks']} chunks × {checked['views']} view(s) verified")


@kdcache_main.command()
@click.argument("src")
@click.argument("dest")
@click.option("--compressor", default=None, help="Compressor of the output (see dump).")
@click.option("--overwrite", is_flag=True)
@clean_errors
def convert(src: str, dest: str, compressor: str | None, overwrite: bool) -> None:
    """Copy a cache to another backend (.zarr ↔ .h5) or compressor, losslessly; every array is checked after."""
    from kdcache.cache.convert import convert as run

    run(src, dest, compressor, overwrite)
    click.echo(f"wrote {dest} (verified equal to {src})")


@kdcache_main.command()
@click.argument("src")
@click.argument("dest")
@click.option("--overwrite", is_flag=True)
@clean_errors
def pack(src: str, dest: str, overwrite: bool) -> None:
    """Pack a cache into one .zip file that zarr reads in place (locally or over HTTP)."""
    from kdcache.cache.convert import pack as run

    run(src, dest, overwrite)
    click.echo(f"wrote {dest} (verified equal to {src})")


@kdcache_main.command()
@click.argument("caches", nargs=-1, required=True)
@click.option("--out", required=True, help="The ensemble cache (.zarr or .h5).")
@click.option("--mode", type=click.Choice(["mean-prob", "mean-logit"]), default="mean-prob", show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="mean-prob averages softmax(z/T); the stored logits reproduce it exactly at this T.")
@click.option("--weights", default=None, help="Member weights, comma-separated (normalised to sum 1).")
@click.option("--overwrite", is_flag=True)
@clean_errors
def merge(caches: tuple[str, ...], out: str, mode: str, temperature: float, weights: str | None,
          overwrite: bool) -> None:
    """Merge several teachers' caches of one dataset into an ensemble cache."""
    from kdcache.cache.merge import merge as run

    w = _floats(weights, "--weights")
    run(list(caches), out, mode, temperature, list(w) if w else None, overwrite, _command_line())
    click.echo(f"wrote {out}")


@kdcache_main.command()
@click.argument("caches", nargs=-1, required=True)
@click.option("--out", required=True, help="The joined cache (.zarr or .h5).")
@click.option("--overwrite", is_flag=True)
@clean_errors
def join(caches: tuple[str, ...], out: str, overwrite: bool) -> None:
    """Join caches of one dump over disjoint --rows ranges into one cache."""
    from kdcache.cache.join import join as run

    start, stop, n = run(list(caches), out, overwrite, _command_line())
    span = "all of the dataset" if (start, stop) == (0, n) else f"a range cache; the dataset has {n}"
    click.echo(f"wrote {out} (rows {start}:{stop}, {span})")


kdcache_main.add_command(kdtrain_main, "train")
