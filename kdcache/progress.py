"""Progress that fits where it goes: a live bar on a terminal; in a pipe or a file (CI, nohup, a cluster job's log)
one plain line every few seconds with rate and ETA, and never a carriage return."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

PLAIN_INTERVAL_S = 10.0


def _rate(n: float, unit: str) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix} {unit}s/s"
    return f"{n:.0f} {unit}s/s"


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _Plain:
    """`done/total (pct), rate, ETA` lines at most every `interval` seconds, and one at the end."""

    def __init__(self, total: int, desc: str, unit: str, file: TextIO, interval: float) -> None:
        self.total, self.desc, self.unit, self.file, self.interval = total, desc, unit, file, interval
        self.n, self.t0 = 0, time.monotonic()
        self.last = self.t0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval and self.n < self.total:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = max(now - self.t0, 1e-9)
        rate = self.n / elapsed
        eta = f", ETA {_clock((self.total - self.n) / rate)}" if rate > 0 and self.n < self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}s{pct}, {_rate(rate, self.unit)}, "
              f"{_clock(elapsed)} elapsed{eta}", file=self.file, flush=True)

    def close(self) -> None:
        if self.n:
            self._line(time.monotonic())


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    """Context manager with `update(n)`: a tqdm bar on a terminal, plain lines elsewhere, nothing when disabled."""

    def __init__(self, total: int, desc: str, unit: str = "sample", enable: bool = True,
                 file: TextIO | None = None, interval: float = PLAIN_INTERVAL_S) -> None:
        file = file or sys.stderr
        if not enable:
            self._impl: object = _Silent()
        elif file.isatty():
            from tqdm import tqdm

            self._impl = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, leave=False,
                              file=file, mininterval=0.5)
        else:
            self._impl = _Plain(total, desc, unit, file, interval)

    def update(self, n: int = 1) -> None:
        self._impl.update(n)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._impl.close()


def progress(total: int, desc: str, unit: str = "sample", enable: bool = True) -> Progress:
    return Progress(total, desc, unit, enable)


def say(line: str, enable: bool = True) -> None:
    """One line of progress news on stderr (e.g. an epoch's metrics), when progress output is on."""
    if enable:
        print(line, file=sys.stderr, flush=True)
