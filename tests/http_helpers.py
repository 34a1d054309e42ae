"""Helpers shared by the HTTP tests: raw bytes over a socket, and an HTTP-only emulated worker."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def raw_http(address: tuple[str, int], data: bytes) -> bytes:
    """Send ``data`` as is (malformed requests included), half-close, and read until the server closes."""
    with socket.create_connection(address[:2], timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
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
