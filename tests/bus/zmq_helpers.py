"""Bounded receives and subscription handshakes for socket tests (nothing here can hang)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import zmq

from tests.conftest import FIXTURES
from tests.waiting import eventually

PROBE = b"\x00probe"
TOPIC = "kv@vllm-pod-0@Qwen/Qwen3-0.6B"


def recv(sock: zmq.Socket, timeout_ms: int = 2000) -> list[bytes]:
    """One multipart message, or AssertionError after ``timeout_ms``."""
    assert sock.poll(timeout_ms, zmq.POLLIN), f"nothing received within {timeout_ms} ms"
    return sock.recv_multipart()


def nothing_within(sock: zmq.Socket, timeout_ms: int) -> bool:
    return not sock.poll(timeout_ms, zmq.POLLIN)


def wait_subscribed(send_probe: Callable[[], None], sub: zmq.Socket, timeout_s: float = 5.0) -> None:
    """Probe until ``sub`` (subscribed to :data:`PROBE` too) hears the publisher, then drain probes.

    Subscriptions travel in order on one connection, so once a probe arrives the
    real topic's subscription is in place as well (no slow-joiner loss after this).
    """

    def heard() -> bool:
        send_probe()
        return bool(sub.poll(20, zmq.POLLIN))

    eventually(heard, timeout_s=timeout_s, what="the subscription reached the publisher", interval_s=0)
    while sub.poll(50, zmq.POLLIN):
        frames = sub.recv_multipart()
        assert frames[0] == PROBE, f"unexpected message while draining probes: {frames[:2]}"


def captured_stream() -> dict:
    """frames.json plus every rank-0 payload by seq (``.bin`` files and the replay captures)."""
    meta = json.loads((FIXTURES / "frames.json").read_text())
    rank0 = meta["replay_captures"]["dp_rank_0"]
    payloads = {0: bytes.fromhex(rank0["req_from_0"][0][2]["hex"])}
    for message in rank0["dealer_from_1"]:
        seq_hex = message[2]["hex"]
        if seq_hex != "ff" * 8:
            payloads[int(seq_hex, 16)] = bytes.fromhex(message[3]["hex"])
    return {"meta": meta, "payloads": payloads}


def fixture_bin(name: str) -> bytes:
    return (Path(FIXTURES) / f"{name}.bin").read_bytes()
