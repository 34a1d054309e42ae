"""The router's request table: every accepted request that has not had its terminal reply yet.

Invariants (``RouterService`` keeps them through :meth:`RequestTable.add` and
:meth:`RequestTable.remove`, the only ways in and out):

* a request is in the table from its acceptance until its one terminal reply (``Completion`` or
  ``ErrorReply``) is sent; ``remove`` is called exactly then;
* its key (``{router_id}-{n}``) is unique for the router's life and is what workers see; two
  clients may use the same request id, one client never two at once (``in_flight``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from bus.schema import GenerateRequest
from core.prefix_index import WorkerKey


@dataclass
class PendingRequest:
    key: str  # router-unique id, what workers see
    client: bytes
    request: GenerateRequest
    token_ids: list[int]
    accepted_s: float
    accepted_wall_s: float
    deadline_s: float
    target: WorkerKey | None = None
    predicted_cached_tokens: int = 0
    streamed: bool = False
    relayed_chunks: int = 0  # TokenChunks relayed to the client from the current target, in seq order
    first_token_s: float | None = None
    retries: int = 0
    tried: set[WorkerKey] = field(default_factory=set)

    @property
    def worker_id(self) -> str | None:
        return None if self.target is None else self.target.worker_id


class RequestTable:
    """Pending requests by key and by (client, request id)."""

    def __init__(self, *, router_id: str) -> None:
        self._router_id = router_id
        self._ids = itertools.count(1)
        self.by_key: dict[str, PendingRequest] = {}
        self._by_client: dict[tuple[bytes, str], str] = {}

    def __len__(self) -> int:
        return len(self.by_key)

    def __iter__(self) -> Iterator[PendingRequest]:
        return iter(list(self.by_key.values()))  # a copy: callers finish requests while iterating

    def new_key(self) -> str:
        return f"{self._router_id}-{next(self._ids)}"

    def get(self, key: str) -> PendingRequest | None:
        return self.by_key.get(key)

    def key_of(self, client: bytes, request_id: str) -> str | None:
        """The key of ``client``'s request ``request_id`` in flight, or None."""
        return self._by_client.get((client, request_id))

    def in_flight(self, client: bytes, request_id: str) -> bool:
        return (client, request_id) in self._by_client

    def add(self, p: PendingRequest) -> None:
        self.by_key[p.key] = p
        self._by_client[(p.client, p.request.request_id)] = p.key

    def remove(self, p: PendingRequest) -> None:
        self.by_key.pop(p.key, None)
        self._by_client.pop((p.client, p.request.request_id), None)

    def expired(self, now: float) -> list[PendingRequest]:
        return [p for p in self.by_key.values() if now >= p.deadline_s]

    def on_worker(self, worker_id: str) -> list[PendingRequest]:
        """Requests currently routed to any rank of ``worker_id``."""
        return [p for p in self.by_key.values() if p.target is not None and p.target.worker_id == worker_id]
