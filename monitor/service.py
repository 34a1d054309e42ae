"""The monitor process: SUB to metrics publishers, fold, dump, serve HTTP.

Sockets::

    router PUB (bind) ──[topic, MetricsRecord]──▶ SUB (connect) monitor
    monitor HTTP (127.0.0.1 by default):  /metrics  Prometheus text
                                          /json     the dump (``?light=1``: without the fold's
                                                    raw samples, what ``kvr dash`` polls)
                                          /healthz  "ok"

One thread owns the SUB socket and the state; the HTTP server's threads only
read the state, under ``lock``. Dumps are written on an interval, when
:meth:`MonitorService.request_dump` is called (the CLI wires SIGUSR1 to it) and
at exit. A malformed frame is counted and logged, never fatal.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import zmq

from bus import names
from bus.codec import DecodeError, metrics_decoder
from bus.sockets import MAX_REQUEST_BYTES
from monitor import prometheus
from monitor.dump import write_dump
from monitor.state import MonitorState

logger = logging.getLogger(__name__)


class MonitorService:
    """Subscribe to ``metrics_endpoints`` and keep ``state`` up to date.

    ``worker_timeout_s``: a worker with no sample for that long is reported gone.
    ``http_port`` 0 picks a free port (see :attr:`http_port` after :meth:`start`);
    ``None`` disables HTTP.
    """

    def __init__(
        self,
        *,
        metrics_endpoints: Sequence[str],
        state: MonitorState,
        dump_path: str | Path | None = None,
        dump_interval_s: float = 5.0,
        http_host: str = "127.0.0.1",
        http_port: int | None = 0,
        worker_timeout_s: float = 10.0,
        ctx: zmq.Context | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.lock = threading.Lock()
        self.dump_path = Path(dump_path) if dump_path else None
        self.dump_interval_s = dump_interval_s
        self.worker_timeout_s = worker_timeout_s
        self._clock = clock
        self._endpoints = list(metrics_endpoints)
        self._ctx = ctx or zmq.Context.instance()
        self._sub: zmq.Socket | None = None
        self._decoder = metrics_decoder()
        self._http_host = http_host
        self._http_port = http_port
        self._http: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._dump_requested = threading.Event()
        self.stop_event = threading.Event()
        self.dumps_written = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect the SUB socket and start the HTTP server (idempotent)."""
        if self._sub is None:
            sub = self._ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)  # records are small: cut off a peer that is not
            sub.setsockopt(zmq.SUBSCRIBE, names.METRICS_TOPIC_PREFIX)
            for endpoint in self._endpoints:
                sub.connect(endpoint)
            self._sub = sub
            logger.info("monitor subscribed to %s", ", ".join(self._endpoints) or "(nothing)")
        if self._http_port is not None and self._http is None:
            self._http = ThreadingHTTPServer((self._http_host, self._http_port), _handler_for(self))
            self._http.daemon_threads = True
            self._http_thread = threading.Thread(target=self._http.serve_forever, name="monitor-http", daemon=True)
            self._http_thread.start()
            logger.info("monitor HTTP on http://%s:%d (/metrics, /json, /healthz)", self._http_host, self.http_port)

    @property
    def http_port(self) -> int | None:
        return None if self._http is None else self._http.server_address[1]

    def request_dump(self) -> None:
        """Ask for a dump at the next loop turn (safe from a signal handler)."""
        self._dump_requested.set()

    def stop(self) -> None:
        """Make :meth:`run` return (safe from a signal handler or another thread)."""
        self.stop_event.set()

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None

    # ------------------------------------------------------------------ loop

    def run(self, *, poll_ms: int = 100) -> None:
        """Receive until :meth:`stop`; write a final dump at the end."""
        self.start()
        next_dump = self._clock() + self.dump_interval_s
        try:
            while not self.stop_event.is_set():
                self.poll_once(poll_ms)
                now = self._clock()
                if self._dump_requested.is_set() or (self.dump_path and now >= next_dump):
                    self._dump_requested.clear()
                    self.dump_now()
                    next_dump = now + self.dump_interval_s
        finally:
            self.dump_now()

    def poll_once(self, timeout_ms: int = 100) -> int:
        """Fold whatever arrives within ``timeout_ms``; returns the number of frames read."""
        assert self._sub is not None, "start() first"
        n = 0
        if self._sub.poll(timeout_ms):
            while True:
                try:
                    frames = self._sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                n += 1
                self._on_frames(frames)
        now = self._clock()
        with self.lock:
            self.state.tick(now)
            for wid, sample in list(self.state.workers.items()):
                if now - sample["t_s"] > self.worker_timeout_s:
                    self.state.mark_worker_gone(wid, now)
        return n

    def _on_frames(self, frames: list[bytes]) -> None:
        # [topic, payload]; the payload is always the last frame.
        try:
            record = self._decoder.decode(frames[-1])
        except DecodeError as exc:
            with self.lock:
                self.state.decode_errors += 1
            logger.warning("undecodable metrics frame (topic %r): %s", frames[0][:64], exc)
            return
        with self.lock:
            self.state.add(record)

    def snapshot(self, *, light: bool = False) -> dict:
        """The dump as data (consistent: taken under the lock); ``light`` leaves the fold out."""
        with self.lock:
            return self.state.dump(now_s=self._clock(), light=light)

    def dump_now(self) -> Path | None:
        """Write the dump file now (no-op without ``dump_path``)."""
        if self.dump_path is None:
            return None
        try:
            write_dump(self.dump_path, self.snapshot())
        except OSError as exc:
            logger.error("cannot write dump %s: %s", self.dump_path, exc)
            return None
        self.dumps_written += 1
        logger.debug("dump written to %s", self.dump_path)
        return self.dump_path


def _handler_for(service: MonitorService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path, _, query = self.path.partition("?")
            if path == "/metrics":
                with service.lock:
                    body = prometheus.render(service.state).encode()
                self._reply(200, prometheus.CONTENT_TYPE, body)
            elif path in ("/json", "/dump"):
                light = "light=1" in query.split("&")
                body = json.dumps(service.snapshot(light=light), allow_nan=False).encode()
                self._reply(200, "application/json", body)
            elif path == "/healthz":
                self._reply(200, "text/plain", b"ok\n")
            else:
                self._reply(404, "text/plain", b"not found: try /metrics, /json, /healthz\n")

        def _reply(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args) -> None:
            logger.debug("http %s", fmt % args)

    return Handler
