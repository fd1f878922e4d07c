"""Print the Markdown tables of docs/BENCHMARKS.md from bench/results/*.json (no measuring).

    .venv/bin/python bench/report.py [reader rss train_step dump_throughput scaling]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

COLUMNS = {
    "reader": ("rows", ["cache", "N", "backend", "reader", "samples/s", "x naive", "x chunked", "note",
                        "other CPU %"]),
    "rss": ("rows", ["N", "mode", "peak_rss_mb", "peak min-max", "delta_vs_smallest_mb", "maxrss_incl_exit_mb",
                     "maxrss_delta_mb", "end_rss_mb", "train_s", "train_samples_per_s", "runs", "other CPU %"]),
    "train_step": ("rows", ["student", "mode", "samples/s", "median-step samples/s", "x plain",
                            "x plain (median step)", "x plain (CPU time)", "predicted x plain", "online/cached",
                            "online/cached (median step)", "online/cached (CPU time)", "steps", "other CPU %"]),
    "dump_throughput": ("throughput", ["teacher", "dataset", "N", "bare samples/s", "dump samples/s", "dump/bare",
                                       "dump/bare (best)", "dump/bare (CPU time)", "loop/bare", "loop/bare (best)",
                                       "fixed s", "finalize s", "pairs used", "other CPU %"]),
    "scaling": ("rows", ["stage", "scale", "N", "wall_s", "cpu_s", "x time vs 1x", "samples/s", "marginal samples/s",
                         "marginal samples/CPU-s", "epoch samples/s", "peak_rss_mb", "peak +MB vs 1x", "cache_mb",
                         "other CPU %"]),
}
BYTES = ["layout", "format", "compressor", "logit B/sample", "labels+views B/sample", "data B/sample", "metadata B",
         "total bytes"]


def main() -> None:
    names = sys.argv[1:] or list(COLUMNS)
    for name in names:
        path = common.RESULTS / f"{name}.json"
        if not path.exists():
            print(f"## {name}: no results yet\n")
            continue
        d = json.loads(path.read_text())
        key, cols = COLUMNS[name.split("_repeat")[0]]
        print(f"## {name}\n\n`{d['command']}` at {d['when']} (1-min load average at end {d.get('loadavg_1min_at_end')})\n")
        print(common.machine_line(d["machine"]) + "\n")
        rows = d[key]
        print(common.table(rows, [c for c in cols if any(c in r for r in rows)]) + "\n")
        for extra in ("kd_overhead",):
            if extra in d:
                print(common.table(d[extra]) + "\n")
        for extra in ("bytes_real", "bytes_synthetic"):
            if extra in d:
                print(f"{extra}:\n\n" + common.table(d[extra], BYTES) + "\n")
        if d.get("target") is not None:
            print("target: " + json.dumps(d["target"]) + "\n")


if __name__ == "__main__":
    main()
