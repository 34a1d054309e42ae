"""A client of several router replicas: requests spread over them, and fail over when one goes.

One :class:`~bus.client.RouterClient` per replica endpoint (a single DEALER connected to several
routers would round-robin a ``CancelRequest`` to a router that never saw the request, and could
not tell which router's loss ended which requests). Requests go to the live replica with the
fewest requests pending (ties: in endpoint order, rotating), so load spreads evenly and a dead
replica gets nothing new.

Failover: a replica whose connection is lost ends its pending requests with
``ROUTER_RESTARTED`` (``RouterClient``). Those that saw nothing yet (no ``Routed``, no token) are
sent again, once, to another live replica under the same request id: the client cannot have
seen a partial answer, so the retry is safe; a request that had started streaming ends with
that explicit error, as it would with one router. Invariant: every request sent gets exactly
one terminal result from :meth:`ReplicaClient.poll`.
"""

from __future__ import annotations

import itertools
import logging
import math
import time

import zmq

from bus.client import RequestResult, RouterClient
from bus.schema import ErrorCode, GenerateRequest
from bus.security import Curve

logger = logging.getLogger(__name__)


class ReplicaClient:
    def __init__(self, *, endpoints: list[str], ctx: zmq.SyncContext | None = None, curve: Curve | None = None,
                 max_failovers: int = 1) -> None:
        if not endpoints:
            raise ValueError("no router endpoint given")
        self.endpoints = list(endpoints)
        self._clients = [RouterClient(endpoint=e, ctx=ctx, curve=curve) for e in self.endpoints]
        self._poller = zmq.Poller()  # every replica's sockets: a reply from any one wakes poll()
        for client in self._clients:
            client.register(self._poller)
        self._rotation = itertools.cycle(range(len(self._clients)))
        self._requests: dict[str, tuple[GenerateRequest, int]] = {}  # request id -> (request, failovers so far)
        self._owner: dict[str, RouterClient] = {}
        self.max_failovers = max_failovers
        self.failovers = 0
        #: Results by request id, across replicas (a failed-over request keeps its first send time).
        self.pending: dict[str, RequestResult] = {}

    def _live(self) -> list[RouterClient]:
        live = [c for c in self._clients if c.session_up or c.connection_losses == 0]
        return live or self._clients  # none known alive: try them all (a replica may be back)

    def _pick(self, avoid: RouterClient | None = None) -> RouterClient:
        live = self._live()
        pool = [c for c in live if c is not avoid] or live
        start, n = next(self._rotation), len(self._clients)
        # Fewest pending; ties in endpoint order from a rotating start (so they spread).
        return min(pool, key=lambda c: (len(c.pending), (self._clients.index(c) - start) % n))

    def send(self, request: GenerateRequest) -> RequestResult:
        client = self._pick()
        result = client.send(request)
        self._requests[request.request_id] = (request, 0)
        self._owner[request.request_id] = client
        self.pending[request.request_id] = result
        return result

    def cancel(self, request_id: str) -> None:
        client = self._owner.get(request_id)
        if client is not None:
            client.cancel(request_id)

    def poll(self, timeout_ms: int = 100) -> list[RequestResult]:
        """Terminal results from every replica; requests lost with a replica before any answer are
        sent again elsewhere instead of returned."""
        finished: list[RequestResult] = []
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            # Every replica read as soon as any is readable: a reply is stamped when it is read
            # (first_token_s), so one replica must never wait on another's timeout.
            for client in self._clients:
                for result in client.poll(0):
                    done = self._settle(client, result)
                    if done is not None:
                        finished.append(done)
            left_ms = (deadline - time.monotonic()) * 1000
            if finished or left_ms <= 0:
                return finished
            self._poller.poll(math.ceil(left_ms))

    def _settle(self, client: RouterClient, result: RequestResult) -> RequestResult | None:
        rid = result.request_id
        request, failovers = self._requests.get(rid, (None, 0))
        # Lost with its replica before any output: the client saw no part of an answer (a Routed
        # at most), so sending it again elsewhere cannot duplicate anything it saw.
        lost = (result.error is not None and result.error.code is ErrorCode.ROUTER_RESTARTED
                and result.first_token_s is None and not result.token_ids)
        if request is not None and lost and failovers < self.max_failovers:
            other = self._pick(avoid=client)
            if other is not client:
                self.failovers += 1
                logger.info("request %s lost with router %s before any answer: sent again to %s", rid,
                            client.endpoint, other.endpoint)
                retry = other.send(request)
                retry.sent_s = result.sent_s  # the user waited since the first send
                self._requests[rid] = (request, failovers + 1)
                self._owner[rid] = other
                self.pending[rid] = retry
                return None
        self._requests.pop(rid, None)
        self._owner.pop(rid, None)
        self.pending.pop(rid, None)
        return result

    @property
    def connection_losses(self) -> int:
        return sum(c.connection_losses for c in self._clients)

    @property
    def late_replies(self) -> int:
        return sum(c.late_replies for c in self._clients)

    @property
    def unmatched_replies(self) -> int:
        return sum(c.unmatched_replies for c in self._clients)

    def close(self) -> None:
        for client in self._clients:
            client.close()

    def __enter__(self) -> ReplicaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
