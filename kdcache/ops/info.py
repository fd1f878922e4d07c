"""`kdcache info`: what a cache holds, in numbers a person can check."""

from __future__ import annotations

import os

from kdcache.errors import printable
from kdcache.format.spec import row_range
from kdcache.io.reader import Cache

NEAR_ONE_HOT_TOP1 = 0.99


def bytes_on_disk(path: str) -> int | None:
    """Total size of a local cache file or directory (None for remote URLs)."""
    if "://" in path:
        return None
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def summary(cache: Cache) -> dict:
    """The attributes plus derived figures: sizes, bytes per sample, teacher quality, warnings."""
    a = cache.attrs
    size = bytes_on_disk(cache.path)
    stats = a.get("stats", {})
    done = cache.done_map()
    warnings = []
    top1 = stats.get("teacher_top1")
    if a["dataset"]["split"] == "train" and top1 is not None and top1 >= NEAR_ONE_HOT_TOP1:
        warnings.append(
            f"the teacher scores {100 * top1:.1f}% top-1 on this split: it probably trained on it, so its logits are "
            "nearly one-hot and carry little dark knowledge; prefer a held-out transfer set or augmented views"
        )
    if a["status"] != "complete":
        warnings.append(f"partial cache: {int(done.sum())} of {len(done)} chunks written; finish it with --resume")
    return {
        "path": cache.path, "format": f"{a['format']} {a['version']}", "status": a["status"],
        "n": cache.n, "rows": list(row_range(a)) if a.get("rows") is not None else None,
        "dataset_n": a["dataset"]["n"], "num_classes": cache.num_classes, "kind": cache.kind, "k": cache.k,
        "n_views": cache.n_views,
        "value_dtype": a["value_dtype"], "compressor": a.get("compressor"), "chunk_rows": a["chunk_rows"],
        "bytes_on_disk": size, "bytes_per_sample": None if size is None else size / cache.n,
        "positions": cache.layout.positions, "vocab": a["dataset"].get("vocab"),
        "bytes_per_token": None if size is None or not cache.layout.positions else
        size / (cache.n * cache.layout.positions),
        "decoded_bytes": cache.decoded_bytes(),
        "teacher": a["teacher"]["name"], "teacher_weights": a["teacher"]["weights"],
        "teacher_params": a["teacher"].get("params"), "teacher_top1": top1,
        "mean_entropy": stats.get("mean_entropy"), "topk_mass": stats.get("topk_mass"),
        "image_size": a["teacher"]["preprocess"].get("image_size"),
        "input": a["dataset"].get("input") or {"kind": "image", "shape": a["dataset"].get("base_shape")},
        "dataset": a["dataset"]["spec"], "split": a["dataset"]["split"], "fingerprint": a["dataset"]["fingerprint"],
        "labelled": _labelled(cache), "class_names": a["dataset"]["class_names"],
        "augment": a["views"]["augment"], "seed": a["views"]["seed"],
        "joined_from": _joined_from(a),
        "features": a.get("features") or [], "sampling": a.get("sampling"),
        "created": a["created"], "tool": a["tool"], "command": a["command"], "warnings": warnings,
    }


def _labelled(cache: Cache) -> int | None:
    """Labelled samples in this cache: the dataset's count, or for a range cache its own (once complete)."""
    if cache.attrs.get("rows") is None:
        return cache.attrs["dataset"].get("labelled")
    return int((cache.labels >= 0).sum()) if cache.complete else None


def _contents(s: dict) -> str:
    """What a row holds: full logits, top-k + tail, and/or sampled soft labels."""
    parts = [] if s["kind"] == "sampled" else ["full logits" if s["kind"] == "full" else f"top-{s['k']} logits + tail"]
    if s["sampling"]:
        parts.append(f"{s['sampling'].get('m')} draws at T={s['sampling'].get('temperature')}")
    return " + ".join(parts)


def _samples(s: dict) -> str:
    if s["positions"]:
        return (f"{s['n']} sequences × {s['positions']} positions ({s['n'] * s['positions']} tokens), "
                f"{s['n_views']} view(s), {s['num_classes']} classes")
    return f"{s['n']} × {s['n_views']} view(s), {s['num_classes']} classes"


def _per_row(s: dict) -> str:
    if s["bytes_per_token"] is not None:
        return f"{s['bytes_per_token']:.1f} B/token"
    return f"{_fmt_bytes(s['bytes_per_sample'])}/sample"


def _input(s: dict) -> str:
    """What the teacher was given: images at N px, or tensors of a shape and dtype as the dataset yields them."""
    if s["image_size"] is not None:
        return f"{s['image_size']} px"
    i = s["input"]
    return f"tensors {'×'.join(map(str, i.get('shape') or []))} {i.get('dtype', '')}".rstrip()


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return ""


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _cell(text: object) -> str:
    """Safe inside a Markdown table cell (and inside a code span)."""
    return printable(text).replace("|", "\\|").replace("`", "'")


def _rows(s: dict) -> str:
    if s["rows"] is None:
        return f"all {s['n']}"
    return f"{s['rows'][0]}:{s['rows'][1]} of {s['dataset_n']} (a range cache: join the ranges before training)"


def _joined_from(a: dict) -> list | None:
    """The rows of each member of a joined cache (None when it was not joined; '?' where damaged)."""
    members = a.get("join", {}).get("members") if isinstance(a.get("join"), dict) else None
    if not isinstance(members, list):
        return None
    return [m.get("rows") if isinstance(m, dict) else None for m in members]


def _joined(s: dict) -> str:
    spans = [f"{r[0]}:{r[1]}" if isinstance(r, list) and len(r) == 2 else "?" for r in s["joined_from"]]
    return f"from {len(spans)} range caches (rows {', '.join(spans)})"


def as_text(s: dict) -> str:
    """Aligned `key: value` lines for the terminal."""
    kind = _contents(s)
    names = s["class_names"]
    lines = [
        ("cache", f"{s['path']} ({s['format']}, {s['status']})"),
        ("samples", _samples(s) + f", {kind}, {s['value_dtype']}"),
        ("on disk", f"{_fmt_bytes(s['bytes_on_disk'])} ({_per_row(s)}, "
                    f"{s['compressor']}; {_fmt_bytes(s['decoded_bytes'])} decoded)"),
        ("teacher", f"{s['teacher']} ({s['teacher_params'] or '?'} params, {_input(s)}), "
                    f"weights sha256 {str(s['teacher_weights'].get('sha256'))[:16]}…"),
        ("teacher top-1", _pct(s["teacher_top1"]) + f" on {s['labelled']} labelled samples"),
        ("mean entropy", "n/a" if s["mean_entropy"] is None else f"{s['mean_entropy']:.4f} nats"),
        ("top-k mass", _pct(s["topk_mass"]) if s["kind"] == "topk" else "1 (full logits)" if s["kind"] == "full"
         else "n/a"),
        *([("features", ", ".join(f"{f['layer']} ({f['pool']}, {'×'.join(map(str, f['shape']))})"
                                  for f in s["features"]))] if s["features"] else []),
        ("dataset", f"{s['dataset']} [{s['split']}], {s['fingerprint'][:23]}…"),
        ("rows", _rows(s)),
        ("vocabulary", f"{s['vocab'].get('name')}, {s['vocab'].get('size')} tokens") if s["vocab"] else
        ("classes", ", ".join(names[:10]) + (f", … ({len(names)} in all)" if len(names) > 10 else "")),
        ("views", f"augment {s['augment']}, seed {s['seed']}"),
        *([("joined", _joined(s))] if s["joined_from"] else []),
        ("created", f"{s['created']} by {s['tool']}"),
        ("command", s["command"] or "n/a"),
    ]
    width = max(len(k) for k, _ in lines)
    out = [f"{k:>{width}}: {printable(v)}" for k, v in lines]
    out += [f"{'warning':>{width}}: {printable(w)}" for w in s["warnings"]]
    return "\n".join(out)


def as_markdown(s: dict) -> str:
    """A cache card to publish beside a shared cache."""
    s = {k: _cell(v) if isinstance(v, str) else v for k, v in s.items()}
    s["teacher_weights"] = {k: _cell(v) for k, v in s["teacher_weights"].items()}
    rows = [
        ("Teacher", f"`{s['teacher']}` ({s['teacher_params'] or '?'} parameters, input {_input(s)})"),
        ("Weights", f"{s['teacher_weights'].get('source', '?')}, sha256 `{s['teacher_weights'].get('sha256')}`"),
        ("Dataset", f"`{s['dataset']}` split `{s['split']}`, {s['dataset_n']} samples, {s['num_classes']} classes"),
        ("Rows", _rows(s)),
        ("Fingerprint", f"`{s['fingerprint']}`"),
        ("Teacher top-1 on this split", _pct(s["teacher_top1"])),
        ("Contents", f"{s['kind']}" + (f" (k={s['k']}, mean mass kept {_pct(s['topk_mass'])})" if s['k'] else "")
         + f", {s['n_views']} view(s), {s['value_dtype']}"),
        ("Size", f"{_fmt_bytes(s['bytes_on_disk'])} ({_per_row(s)})"),
        ("Format", f"{s['format']}, status {s['status']}"),
        *([("Joined", _joined(s))] if s["joined_from"] else []),
        ("Made by", f"{s['tool']}, {s['created']}"),
        ("Command", f"`{s['command']}`"),
    ]
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    notes = "".join(f"\n> **Note:** {printable(w)}\n" for w in s["warnings"])
    return f"# Cache card: {printable(os.path.basename(s['path'].rstrip('/')))}\n\n| | |\n|---|---|\n{body}\n{notes}"
