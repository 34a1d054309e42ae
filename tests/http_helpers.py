"""Helpers shared by the HTTP tests: raw bytes over a socket, and an HTTP-only emulated worker."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def raw_http(address: tuple[str, int], data: bytes) -> bytes:
    """Send ``data`` as is (malformed requests included) and read until the server closes.

    No half-close: aiohttp (like uvicorn) takes a client's EOF for its leaving, and drops what it
    would have answered. ``data`` must make the server close: malformed HTTP does, a request
    with ``Connection: close`` or in HTTP/1.0 too (an idle keep-alive one only after its timeout)."""
    with socket.create_connection(address[:2], timeout=10) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@contextmanager
def http_only_worker(worker_id: str, *, seed: int) -> Iterator:
    """An emulated worker with its HTTP face only (no router), on its own thread."""
    from worker.runner import WorkerOptions, WorkerRunner

    runner = WorkerRunner(WorkerOptions(worker_id=worker_id, router_endpoint="none", http_port=0, speedup=50.0,
                                        seed=seed))
    th = threading.Thread(target=runner.run, daemon=True)
    th.start()
    try:
        yield runner
    finally:
        runner.stop()
        th.join(timeout=5)
        assert not th.is_alive()
