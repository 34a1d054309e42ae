"""The router's worker registry: who holds each worker id, on which connection, serving what.

Invariants:

* a worker id belongs to one live connection (``identity``); ``by_identity`` maps that
  connection back to the id, and to nothing once the worker is gone or has moved to a new
  connection;
* another claimant of a held id is refused while the holder is alive (``claim_refusal``); with
  CURVE an id is bound, for the router's life, to the public key that first registered it;
* ``models_served`` and ``min_model_len`` describe exactly the registered workers (refreshed on
  every change), so most requests are checked against the fleet without a per-worker scan.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from bus.schema import (
    REFUSED_DUPLICATE_ID,
    REFUSED_KEY_MISMATCH,
    ErrorCode,
    ErrorReply,
    GenerateRequest,
    Hello,
    Refused,
)
from core.admission import AdmissionLimits
from core.liveness import LivenessTracker
from core.prefix_index import WorkerKey


@dataclass
class RegisteredWorker:
    identity: bytes  # the worker's DEALER identity on the router's worker socket
    hello: Hello
    targets: list[WorkerKey]


class WorkerRegistry:
    def __init__(self, *, curve: bool = False) -> None:
        """``curve``: worker ids are bound to the CURVE key that first registered them."""
        self._curve = curve
        self._workers: dict[str, RegisteredWorker] = {}
        self._identities: dict[bytes, str] = {}  # worker DEALER identity -> worker id
        self._id_keys: dict[str, str] = {}  # CURVE: worker id -> z85 public key (for this router's life)
        self.models_served: frozenset[str] = frozenset()
        self.min_model_len = 0  # smallest max_model_len a registered worker gave (0: none known)

    # ------------------------------------------------------------------ lookups

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    def __iter__(self) -> Iterator[str]:
        return iter(self._workers)

    def get(self, worker_id: str) -> RegisteredWorker | None:
        return self._workers.get(worker_id)

    def __getitem__(self, worker_id: str) -> RegisteredWorker:
        return self._workers[worker_id]

    def items(self):
        return self._workers.items()

    def values(self):
        return self._workers.values()

    def by_identity(self, identity: bytes) -> RegisteredWorker | None:
        wid = self._identities.get(identity)
        return None if wid is None else self._workers.get(wid)

    # ------------------------------------------------------------------ changes

    def add(self, identity: bytes, hello: Hello, targets: list[WorkerKey]) -> RegisteredWorker:
        worker = RegisteredWorker(identity, hello, targets)
        self._workers[hello.worker_id] = worker
        self._identities[identity] = hello.worker_id
        self._refresh()
        return worker

    def relink(self, worker: RegisteredWorker, identity: bytes, hello: Hello) -> None:
        """The same incarnation on a new connection (or saying Hello again on its own)."""
        self._identities.pop(worker.identity, None)
        worker.identity, worker.hello = identity, hello
        self._identities[identity] = hello.worker_id

    def remove(self, worker_id: str) -> RegisteredWorker | None:
        worker = self._workers.pop(worker_id, None)
        if worker is not None:
            self._identities.pop(worker.identity, None)
            self._refresh()
        return worker

    def bind_key(self, worker_id: str, peer_key: str | None) -> None:
        if self._curve and peer_key is not None:
            self._id_keys.setdefault(worker_id, peer_key)

    def _refresh(self) -> None:
        self.models_served = frozenset(w.hello.model for w in self._workers.values())
        self.min_model_len = min((w.hello.max_model_len for w in self._workers.values() if w.hello.max_model_len > 0),
                                 default=0)

    # ------------------------------------------------------------------ decisions

    def claim_refusal(self, identity: bytes, hello: Hello, *, now: float, peer_key: str | None,
                      liveness: LivenessTracker, timeout_s: float) -> Refused | None:
        """Why this Hello may not have its worker id, or None. The id belongs to one live connection:
        the same connection, or the same incarnation on a new one (proved by ``link_token``), may
        say Hello again; anyone else waits until the holder misses its heartbeat timeout."""
        wid = hello.worker_id
        bound = self._id_keys.get(wid)
        if self._curve and bound is not None and peer_key != bound:
            return Refused(f"worker id {wid!r} is bound to another CURVE key (the one that first registered it); "
                           f"this key ({peer_key or '-'}) may serve only the ids it registered",
                           code=REFUSED_KEY_MISMATCH)
        old = self._workers.get(wid)
        if old is None or old.identity == identity or same_incarnation(old, identity, hello):
            return None
        last = liveness.last_seen(wid)
        if last is None or not liveness.is_alive(wid, now):
            return None  # the holder is proven gone: take over
        retry_after_s = max(0.0, last + timeout_s - now)
        return Refused(f"worker id {wid!r} is in use by a live worker (epoch {old.hello.epoch}, heard from "
                       f"{now - last:.2f} s ago): give this worker another --id", code=REFUSED_DUPLICATE_ID,
                       retry_after_s=round(retry_after_s, 3))

    def unfit_targets(self, req: GenerateRequest, num_tokens: int,
                      limits: AdmissionLimits) -> set[WorkerKey] | ErrorReply:
        """Targets that cannot take ``req`` (another model, a max_model_len too short for the
        prompt), or the error when no registered worker can: what the Hellos say is answered at
        once, not after a round trip to a worker that would refuse it."""
        served = self.models_served
        if (req.model is None or req.model in limits.models or (len(served) == 1 and req.model in served)) and (
                not self.min_model_len or num_tokens < self.min_model_len):
            return set()  # the common case: every worker can take it (no per-worker scan)
        unfit: set[WorkerKey] = set()
        other_model = longest = 0
        for w in self._workers.values():
            h = w.hello
            if req.model is not None and h.model != req.model and req.model not in limits.models:
                other_model += 1
                unfit.update(w.targets)
            elif h.max_model_len and num_tokens >= h.max_model_len:
                longest = max(longest, h.max_model_len)
                unfit.update(w.targets)
        if not self._workers or any(t not in unfit for w in self._workers.values() for t in w.targets):
            return unfit
        if other_model == len(self._workers):
            return ErrorReply(req.request_id, ErrorCode.UNKNOWN_MODEL, f"model {req.model!r} is not served here "
                              f"(served: {', '.join(sorted(served))})")
        return ErrorReply(req.request_id, ErrorCode.PROMPT_TOO_LONG,
                          f"the prompt ({num_tokens} tokens) leaves no room for output under max_model_len {longest} "
                          f"(the longest of the workers{'' if req.model is None else f' serving {req.model!r}'})")


def same_incarnation(held: RegisteredWorker, identity: bytes, hello: Hello) -> bool:
    """Whether ``hello`` comes from the process that registered ``held``: on its connection, or on a
    new one with its secret link token; and still with the same epoch and event endpoint."""
    same_process = identity == held.identity or (bool(hello.link_token) and hello.link_token == held.hello.link_token)
    return same_process and hello.epoch == held.hello.epoch and hello.events_endpoint == held.hello.events_endpoint
