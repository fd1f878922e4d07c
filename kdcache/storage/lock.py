"""An exclusive, crash-safe lock on a cache being written (the OS drops it when the process dies)."""

from __future__ import annotations

import fcntl
import os
from types import TracebackType

from kdcache.errors import KDCacheError


class WriteLock:
    """`flock` on `<target>.lock`; a second writer is refused at once instead of waiting."""

    def __init__(self, target: str) -> None:
        self.path = target.rstrip("/") + ".lock"
        self._fd: int | None = None

    def __enter__(self) -> "WriteLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise KDCacheError(f"cannot write beside {self.path[:-5]} ({e.strerror or e}): "
                                   "choose an --out in a folder you can write") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise KDCacheError(
                    f"another kdcache process is writing {self.path[:-5]} (pid {holder}): wait for it to finish, "
                    "or write to another output"
                ) from None
            try:  # the holder before us may have unlinked this file: then lock the new one instead
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._fd is not None:
            os.unlink(self.path)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
