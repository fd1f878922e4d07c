"""Paste each experiment's Markdown tables (experiments/results/NAME.md) into docs/EXPERIMENTS.md.

The doc marks where each experiment's tables go with a pair of comments:

    <!-- BEGIN results/NAME.md -->
    ... replaced ...
    <!-- END results/NAME.md -->

    .venv/bin/python -m experiments.paste_tables          # after rerunning any experiment
"""

from __future__ import annotations

import os
import re
import sys

from experiments.common import RESULTS, ROOT

DOC = os.path.join(ROOT, "docs", "EXPERIMENTS.md")


def main() -> int:
    with open(DOC) as f:
        doc = f.read()
    pattern = re.compile(r"(<!-- BEGIN results/([\w-]+)\.md -->\n)(.*?)(<!-- END results/\2\.md -->)", re.DOTALL)
    missing = []

    def sub(m: re.Match) -> str:
        path = os.path.join(RESULTS, f"{m[2]}.md")
        if not os.path.exists(path):
            missing.append(m[2])
            return m[0]
        with open(path) as f:
            body = f.read().strip() + "\n"
        return m[1] + body + m[4]

    new = pattern.sub(sub, doc)
    with open(DOC, "w") as f:
        f.write(new)
    print(f"pasted {len(pattern.findall(doc)) - len(missing)} table block(s) into {os.path.relpath(DOC, ROOT)}"
          + (f"; no results yet for {', '.join(missing)}" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
