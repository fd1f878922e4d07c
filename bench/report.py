"""Print the tables of bench/results/*.json as Markdown (no measuring), with each file's command, time and machine.

    .venv/bin/python bench/report.py [NAME ...]     e.g. reader rss train_step dump_throughput_repeat

$KDBENCH_RESULTS reads another folder (e.g. of smoke runs).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

BYTES = ["layout", "format", "compressor", "logit B/sample", "labels+views B/sample", "data B/sample", "metadata B",
         "total bytes"]
# benchmark -> the tables of its JSON, in order: (key, columns; None = every column)
TABLES = {
    "reader": [("rows", ["cache", "N", "backend", "reader", "samples/s", "x naive", "x chunked", "note",
                         "other CPU %"])],
    "rss": [("rows", ["N", "mode", "peak_rss_mb", "peak min-max", "delta_vs_smallest_mb", "maxrss_incl_exit_mb",
                      "maxrss_delta_mb", "end_rss_mb", "train_s", "train_samples_per_s", "runs", "other CPU %"])],
    "mem_probe": [("train_phases", None), ("dump_phases", None)],
    "train_step": [("rows", ["student", "mode", "samples/s", "median-step samples/s", "x plain",
                             "x plain (median step)", "x plain (CPU time)", "predicted x plain", "online/cached",
                             "online/cached (median step)", "online/cached (CPU time)", "steps", "other CPU %"]),
                   ("kd_overhead", None)],
    "dump_throughput": [("throughput", ["teacher", "dataset", "N", "bare samples/s", "dump samples/s", "dump/bare",
                                        "dump/bare (best)", "dump/bare (CPU time)", "loop/bare", "loop/bare (best)",
                                        "fixed s", "finalize s", "pairs used", "other CPU %"]),
                        ("bytes_real", BYTES), ("bytes_synthetic", BYTES)],
    "scaling": [("rows", ["stage", "scale", "N", "wall_s", "cpu_s", "x time vs 1x", "samples/s", "marginal samples/s",
                          "marginal samples/CPU-s", "epoch samples/s", "peak_rss_mb", "peak +MB vs 1x", "cache_mb",
                          "other CPU %"])],
    "views_ranks": [("views", None), ("ranks", None)],
    "join": [("steps", None), ("summary", None)],
    "decode": [("ratio", None), ("workers", None)],
    "tokens": [("bytes", None), ("reader", None), ("dump", None), ("targets", None)],
}


def main() -> None:
    results = Path(os.environ.get("KDBENCH_RESULTS", common.RESULTS))
    names = sys.argv[1:] or sorted(p.stem for p in results.glob("*.json"))
    for name in names:
        path = results / f"{name}.json"
        if not path.exists():
            print(f"## {name}: no results yet\n")
            continue
        d = json.loads(path.read_text())
        load = d.get("loadavg_1min_at_end")
        print(f"## {name}\n\n`{d['command']}` at {d['when']} (1-min load average at end {load})\n")
        print(common.machine_line(d["machine"]) + "\n")
        for key, cols in TABLES[name.split("_repeat")[0]]:
            if key not in d:
                continue
            rows = d[key] if isinstance(d[key], list) else [d[key]]
            if cols is not None:
                cols = [c for c in cols if any(c in r for r in rows)]
            print(f"{key}:\n\n" + common.table(rows, cols) + "\n")
        if d.get("target") is not None:
            print("target: " + json.dumps(d["target"]) + "\n")


if __name__ == "__main__":
    main()
