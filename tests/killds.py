"""Kill point f for tests/test_crash_resume.py: `--dataset killds:digits`, digits that can hang mid-dump.

With KILLHOOK_POINT=f the dataset hangs (tests/killhook.py `hang`: pid to $KILLHOOK_MARKER, then sleep until
killed) when the teacher loop asks for item 700; otherwise it is plain digits.
"""

from __future__ import annotations

import os

from kdcache.data.datasets import ArrayDataset, open_dataset


class HangingDigits(ArrayDataset):
    def __getitem__(self, i):
        if os.environ.get("KILLHOOK_POINT") == "f" and int(i) == 700:
            import killhook

            killhook.hang()
        return super().__getitem__(i)


def digits(split, root=None):
    d = open_dataset("digits", split)
    return HangingDigits(d.info, d.data, d.labels, d.layout)
