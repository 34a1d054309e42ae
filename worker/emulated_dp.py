"""Data parallelism for the emulated worker: ``dp_size`` engines behind one router link.

Like ``vllm serve --data-parallel-size N``: each rank is a whole engine (its own KV
cache, scheduler and event publisher); rank ``r`` publishes on both base ports + ``r``
(``bus.sockets.offset_endpoint_for_dp_rank``, as vLLM), so the base ports must be
fixed. The ``Hello`` says ``dp_size`` and the router subscribes to every rank and
dispatches to one (``Dispatch.dp_rank``); heartbeats carry one load per rank.
Requests from the HTTP face (rank ``-1``) go to the least loaded rank, as vLLM's own
DP load balancer does, unless the client names one (``X-data-parallel-rank``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import msgspec
import zmq

from bus.schema import Dispatch, ErrorCode, Hello, WorkerLoad
from worker.emulated import BackendMessage, EmulatedBackend, EmulatedWorkerConfig
from worker.vllm.exporter import EngineSnapshot

logger = logging.getLogger(__name__)


class EmulatedDPBackend:
    """``dp_size`` :class:`EmulatedBackend` ranks as one backend (same interface)."""

    def __init__(self, *, config: EmulatedWorkerConfig, dp_size: int, ctx: zmq.Context | None = None,
                 **kw: Any) -> None:
        if dp_size < 1:
            raise ValueError("dp_size must be >= 1")
        for name, ep in (("events", config.events_endpoint), ("replay", config.replay_endpoint)):
            if dp_size > 1 and ep is not None and ep.startswith("tcp://") and ep.rpartition(":")[2] == "0":
                raise ValueError(f"--dp-size {dp_size} needs a fixed {name} port (rank r uses the port + r, as vLLM)")
        seed = config.seed
        self.ranks = [
            EmulatedBackend(config=replace(config, dp_rank=r, seed=None if seed is None else seed + r), ctx=ctx, **kw)
            for r in range(dp_size)
        ]
        self.config = config
        self.engine = self.ranks[0].engine  # read-only views (config, max_model_len): rank 0 stands for all
        self.tokenizer = self.ranks[0].tokenizer
        self.events_endpoint = self.ranks[0].events_endpoint
        self.replay_endpoint = self.ranks[0].replay_endpoint

    @property
    def dp_size(self) -> int:
        return len(self.ranks)

    @property
    def rank0(self) -> EmulatedBackend:
        return self.ranks[0]

    # ------------------------------------------------------------------ registration and load

    def hello(self, *, epoch: int, profile: str = "") -> Hello:
        return msgspec.structs.replace(self.ranks[0].hello(epoch=epoch, profile=profile), dp_size=self.dp_size)

    def load(self, dp_rank: int = 0) -> WorkerLoad:
        return self.ranks[dp_rank].load()

    def loads(self) -> dict[int, WorkerLoad]:
        return {r: b.load() for r, b in enumerate(self.ranks)}

    @property
    def num_in_flight(self) -> int:
        return sum(b.num_in_flight for b in self.ranks)

    # ------------------------------------------------------------------ requests

    def submit(self, dispatch: Dispatch) -> None:
        rank = dispatch.dp_rank
        if rank == -1:
            rank = min(range(self.dp_size), key=lambda r: (self.ranks[r].num_in_flight, r))
        if not 0 <= rank < self.dp_size:
            self.ranks[0].reject(dispatch.request_id, ErrorCode.BAD_REQUEST,
                                 f"no DP rank {dispatch.dp_rank} (dp_size {self.dp_size})")
            return
        self.ranks[rank].submit(msgspec.structs.replace(dispatch, dp_rank=rank))

    def cancel(self, request_id: str, **kw: Any) -> bool:
        return any(b.cancel(request_id, **kw) for b in self.ranks)

    def drain(self) -> list[BackendMessage]:
        out: list[BackendMessage] = []
        for b in self.ranks:
            out += b.drain()
        return out

    def advance(self, now: float | None = None) -> float | None:
        dues = [d for d in (b.advance(now) for b in self.ranks) if d is not None]
        return min(dues) if dues else None

    def poll_sockets(self) -> None:
        for b in self.ranks:
            b.poll_sockets()

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        return all([b.reset_prefix_cache(reset_running_requests) for b in self.ranks])

    def restart_publisher(self) -> None:
        for b in self.ranks:
            b.restart_publisher()

    def set_faults(self, faults: Any) -> None:
        for b in self.ranks:
            b.set_faults(faults)

    def cached_block_keys(self, dp_rank: int = 0) -> list[int]:
        return self.ranks[dp_rank].cached_block_keys()

    def snapshot(self) -> list[EngineSnapshot]:
        return [b.snapshot() for b in self.ranks]

    def close(self) -> None:
        for b in self.ranks:
            b.close()
