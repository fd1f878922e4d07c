"""One progress bar for every long loop (samples/s shown by tqdm's rate)."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(total: int, desc: str, unit: str = "sample", enable: bool = True) -> tqdm:
    """A tqdm bar on stderr; silent when disabled or when stderr is not a terminal in CI logs."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, leave=False,
                disable=not enable, file=sys.stderr, mininterval=1.0)
