"""Loopback-only test servers: a static HTTP server with Range support, and moto's S3 in server mode.

Both bind 127.0.0.1 on a free port (port 0), run in daemon threads and are stopped by their
context managers, so a test never reaches past this machine and never leaves a server behind.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import re
import threading
from collections.abc import Iterator
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RequestLog:
    """Thread-safe count of requests by (method, path), plus the ranges asked for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.ranges: list[tuple[str, str]] = []

    def add(self, method: str, path: str, rng: str | None) -> None:
        with self._lock:
            self.counts[(method, path)] += 1
            if rng:
                self.ranges.append((path, rng))

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()
            self.ranges.clear()

    def count(self, method: str | None = None, prefix: str = "", pattern: str | None = None) -> int:
        """Requests whose method matches (any if None) and whose path starts with prefix / matches pattern."""
        rx = re.compile(pattern) if pattern else None
        with self._lock:
            return sum(n for (m, p), n in self.counts.items()
                       if (method is None or m == method) and p.startswith(prefix) and (rx is None or rx.search(p)))

    def paths(self, method: str | None = None, prefix: str = "") -> dict[str, int]:
        """path -> number of requests (of `method`, or of any method)."""
        out: collections.Counter[str] = collections.Counter()
        with self._lock:
            for (m, p), n in self.counts.items():
                if (method is None or m == method) and p.startswith(prefix):
                    out[p] += n
        return dict(out)


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler plus single `Range: bytes=a-b` requests (206 + Content-Range) on files.

    Directories keep the base class behaviour (redirect to a trailing slash, listing); HEAD on a
    file answers its Content-Length and `Accept-Ranges: bytes`.
    """

    log: RequestLog  # set on the subclass made by serve_http
    listing = True   # False: directories answer 404, as static hosts / CDNs / object-store websites do
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers; every response has a Content-Length

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        self.log.add(self.command, path, self.headers.get("Range"))
        local = self.translate_path(self.path)
        if os.path.isdir(local) and not self.listing:
            self.send_error(HTTPStatus.NOT_FOUND, "no directory listings here")
            return
        if os.path.isdir(local) or not os.path.isfile(local):
            # directories (redirect / listing) and 404s as the base class does them
            f = self.send_head()
            if f is not None:
                try:
                    if body:
                        self.copyfile(f, self.wfile)
                finally:
                    f.close()
            return
        size = os.path.getsize(local)
        start, end = 0, size - 1
        partial = False
        rng = self.headers.get("Range")
        if rng:
            m = _RANGE.match(rng.strip())
            if not m or (m.group(1) == "" and m.group(2) == ""):
                self._unsatisfiable(size)
                return
            a, b = m.group(1), m.group(2)
            if a == "":  # suffix range: the last b bytes
                n = int(b)
                if n == 0:
                    self._unsatisfiable(size)
                    return
                start, end = max(0, size - n), size - 1
            else:
                start = int(a)
                end = min(int(b), size - 1) if b else size - 1
            if start >= size or start > end:
                self._unsatisfiable(size)
                return
            partial = True
        length = end - start + 1
        self.send_response(HTTPStatus.PARTIAL_CONTENT if partial else HTTPStatus.OK)
        self.send_header("Content-Type", self.guess_type(local))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body:
            with open(local, "rb") as f:
                f.seek(start)
                self.wfile.write(f.read(length))

    def _unsatisfiable(self, size: int) -> None:
        self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
        self.send_header("Content-Range", f"bytes */{size}")
        self.send_header("Content-Length", "0")
        self.end_headers()


class _QuietServer(ThreadingHTTPServer):
    """Clients that drop a connection (an unclosed remote file being collected) are not an error here."""

    def handle_error(self, request: object, client_address: object) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve_http(root: str, listing: bool = True) -> Iterator[tuple[str, RequestLog]]:
    """Serve `root` at http://127.0.0.1:PORT (a free port) until the block ends; yields (base URL, log)."""
    log = RequestLog()
    handler = type("Handler", (RangeRequestHandler,), {"log": log, "listing": listing})
    server = _QuietServer(("127.0.0.1", 0), functools.partial(handler, directory=root))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def serve_s3() -> Iterator[str]:
    """moto's S3 in server mode on 127.0.0.1 (free port); yields its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request log lines

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
