"""RouterCore: the routing brain shared by the live router and the simulator.

It owns the fleet's targets and their load (engine heartbeats merged with its own in-flight
accounting), asks the prefix index for each request's overlap, lets the policy choose, and
records the decision: the request is in flight on the chosen target, and its blocks are
*tentatively* present there for ``tentative_window_s`` (predict-on-route), so a burst of siblings
does not scatter before the engine's ``BlockStored`` arrives.

Pure: no clock, no I/O. The shell calls, in order per request, ``route`` → (dispatch) →
``on_first_token`` → ``on_finish``; on worker death ``unregister`` returns the requests that were
in flight there so the shell can retry or fail them. KV events go to ``index`` directly.

Load seen by the policy (``WorkerLoad``): ``in_flight`` and ``active_blocks`` are this router's
own; ``queued_prefill_tokens`` is the larger of the engine's last report and this router's
not-yet-prefilled tokens (prompt − predicted cached, until the first token), so the decision
reacts at once to what this router just sent, and still sees load from other routers.

Trust (``set_trust``, from ``core/trust.py``'s closed-loop evidence): a target whose reports fell
short of its index's claims has its overlap scaled before any policy sees it; the prediction
recorded per request stays the unscaled claim, which is what the closed loop judges.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from core.policies import Decision, RouteRequest, RoutingPolicy, WorkerLoad, WorkerState
from core.policies.base import CONFIDENCE_CODES, FleetColumns, decode_blocks_estimate
from core.prefix_index import PrefixIndex, WorkerKey, request_block_hashes

logger = logging.getLogger(__name__)

DEFAULT_TENTATIVE_WINDOW_S = 5.0  # Dynamo's docs suggest 5 s for its predicted-TTL side index
#: From this many targets on, a policy that can score columns (``choose_columns``) gets them instead
#: of a candidate list: numpy's fixed cost (~30 µs a decision) beats ~0.5 µs per candidate only in
#: large fleets (``kvr bench overhead``, 1 M blocks: 64 targets decide faster as a list, 128 as
#: columns at p50 and alike at p99, 512 ~2x faster as columns). Both give the same decisions.
COLUMNS_MIN_TARGETS = 128
#: Predictions kept for replicas at most (``take_shared_routes``): a peer link that stalls costs
#: bounded memory, and predictions older than the tentative window are worthless anyway.
MAX_SHARED_ROUTES = 10_000


class NoTargetsError(LookupError):
    """No registered target can take the request."""


@dataclass(frozen=True, slots=True)
class RoutingInput:
    """A request as the router core needs it (tokens already tokenized)."""

    request_id: str
    token_ids: Sequence[int]
    max_tokens: int = 16
    lora_name: str | None = None
    cache_salt: str | None = None
    pinned_worker_id: str | None = None  # skip the policy (debugging, sticky sessions)


@dataclass(slots=True)
class InFlight:
    """A request the router dispatched and has not seen finish."""

    request_id: str
    target: WorkerKey
    prompt_tokens: int
    prompt_blocks: int
    overlap_blocks: int
    predicted_cached_tokens: int
    dispatched_at: float
    pending_prefill_tokens: int  # 0 once the first token arrived
    first_token_at: float | None = None
    hashes: list[int] = field(default_factory=list, repr=False)  # the prompt's own block hashes
    decode_blocks: int = 0  # KV blocks its output is expected to fill (decode_blocks_estimate)


@dataclass(frozen=True, slots=True)
class RouteResult:
    decision: Decision
    in_flight: InFlight
    block_hashes: list[int]


class PeerTargetLoad(NamedTuple):
    """What another router replica has in flight on one target (its ``RouterCore`` figures)."""

    in_flight: int = 0
    pending_prefill_tokens: int = 0
    decode_blocks: int = 0
    active_blocks: int = 0


@dataclass(slots=True)
class _TargetState:
    key: WorkerKey
    capacity_blocks: int = 0
    engine_running: int = 0
    engine_waiting: int = 0
    engine_queued_prefill_tokens: int = 0
    engine_free_blocks: int = 0
    kv_usage: float = 0.0
    requests: dict[str, InFlight] = field(default_factory=dict)
    pending_prefill_tokens: int = 0
    active_blocks: int = 0  # distinct block hashes of the requests in flight
    # own hash -> in-flight requests using it (a Counter: ``update`` counts a prompt's hashes in C)
    active_hashes: Counter[int] = field(default_factory=Counter)
    decode_blocks: int = 0  # output blocks the requests in flight will fill
    # Router replicas' own accounting of this target (``set_peer_load``): peer id -> its figures.
    peers: dict[str, PeerTargetLoad] = field(default_factory=dict)
    cached_load: WorkerLoad | None = None  # rebuilt only after a change


_CONFIDENCE_CODE = {c: i for i, c in enumerate(CONFIDENCE_CODES)}
_NO_PEER_LOAD = PeerTargetLoad()


def _write_row(cols: tuple[np.ndarray, ...], i: int, w: WorkerState) -> None:
    """Row ``i`` of the columns (``FleetColumns``'s order after ``overlap``) from a candidate."""
    load = w[2]
    cols[0][i] = load[0]
    cols[1][i] = load[3]
    cols[2][i] = load[4]
    cols[3][i] = load[6]
    cols[4][i] = w[4]
    cols[5][i] = _CONFIDENCE_CODE[w[3]]


class RouterCore:
    """Targets, load, and the route → finish lifecycle around a policy and a prefix index."""

    def __init__(
        self,
        *,
        policy: RoutingPolicy,
        index: PrefixIndex,
        block_size: int,
        tentative_window_s: float = DEFAULT_TENTATIVE_WINDOW_S,
        rng: random.Random | None = None,
    ) -> None:
        if index.block_size != block_size:
            raise ValueError(f"index block_size {index.block_size} != router block_size {block_size}")
        self.policy = policy
        self.index = index
        self.block_size = block_size
        self.tentative_window_s = tentative_window_s
        self.rng = rng if rng is not None else random.Random(0)
        self._targets: dict[WorkerKey, _TargetState] = {}
        self._requests: dict[str, InFlight] = {}
        # Candidates as of the last route, with overlap 0, in target order; entries of targets
        # whose load changed are rebuilt lazily, all of them when any confidence changed.
        self._base: list[WorkerState] = []
        self._base_pos: dict[WorkerKey, int] = {}
        self._base_version = -1
        self._dirty: set[WorkerKey] = set()
        # The same candidates as numpy columns, for a policy that scores columns
        # (``choose_columns``, kvr's): kept in step with ``_base`` (rebuilt with it, rows rewritten
        # with its entries); ``_slot_pos`` maps an index slot to its row (-1: not a candidate).
        self._cols: tuple[np.ndarray, ...] | None = None
        self._slot_pos = np.empty(0, dtype=np.int64)
        self.routed_total = 0
        self.predicted_cached_tokens_total = 0
        #: Targets trusted less than fully (``core/trust.py``) -> weight in [0, 1): their overlap is
        #: scaled by it before the policy sees it. Empty in a fleet that agrees with its index, and
        #: then nothing is scaled (decisions exactly as without trust).
        self._trust: dict[WorkerKey, float] = {}
        #: Predictions made since the last ``take_shared_routes`` (router replicas share them):
        #: ``(target, the routed blocks it did not hold)``; None until ``share_routes``.
        self._shared_routes: list[tuple[WorkerKey, list[int]]] | None = None

    # ------------------------------------------------------------------ fleet

    def register(self, target: WorkerKey, *, capacity_blocks: int = 0) -> None:
        """Add (or refresh) a routable target. Its index entries, if any, are kept."""
        state = self._targets.get(target)
        if state is None:
            self._targets[target] = _TargetState(target, capacity_blocks)
            self.index.add_target(target)
            self._base_version = -1
        else:
            state.capacity_blocks = capacity_blocks
            self._dirty.add(target)

    def unregister(self, target: WorkerKey) -> list[InFlight]:
        """Remove a target (dead or gone) and its index entries; returns its in-flight requests."""
        state = self._targets.pop(target, None)
        self._trust.pop(target, None)
        self._base_version = -1
        self.index.remove_target(target)
        self.policy.forget(target)
        if state is None:
            return []
        orphans = list(state.requests.values())
        for rec in orphans:
            self._requests.pop(rec.request_id, None)
        return orphans

    def targets(self) -> list[WorkerKey]:
        return sorted(self._targets)

    def set_trust(self, target: WorkerKey, weight: float) -> None:
        """How far ``target``'s index entries are trusted (``core/trust.py``): its overlap counts
        ``int(overlap × weight)`` blocks in every decision, for every policy, on top of the policy's
        own confidence weights (kvr: ``confidence_weights``), so the two multiply. 1 (the default)
        leaves it untouched. The prediction recorded for the closed loop stays the index's unscaled
        claim (``InFlight.predicted_cached_tokens``): trust is judged on what the entries claim, not
        on what routing made of them."""
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"trust weight {weight} is not in [0, 1]")
        if weight >= 1.0:
            self._trust.pop(target, None)
        else:
            self._trust[target] = weight

    def trust(self, target: WorkerKey) -> float:
        return self._trust.get(target, 1.0)

    def capacity_blocks(self, target: WorkerKey) -> int:
        """The KV-cache capacity the target registered with (its Hello's ``num_gpu_blocks``; 0:
        unknown or not registered)."""
        state = self._targets.get(target)
        return 0 if state is None else state.capacity_blocks

    def free_blocks(self, target: WorkerKey) -> int:
        """The target's free KV blocks as its engine last reported them (0: unknown)."""
        state = self._targets.get(target)
        return 0 if state is None else state.engine_free_blocks

    def update_load(self, target: WorkerKey, *, running: int = 0, waiting: int = 0,
                    queued_prefill_tokens: int = 0, kv_usage: float = 0.0, num_free_blocks: int = 0) -> None:
        """The engine's own view of its load, from a heartbeat. Unknown targets are ignored."""
        state = self._targets.get(target)
        if state is not None:
            state.engine_free_blocks = num_free_blocks  # reported, not used to decide
            state.cached_load = None
            self._dirty.add(target)
            state.engine_running = running
            state.engine_waiting = waiting
            state.engine_queued_prefill_tokens = queued_prefill_tokens
            state.kv_usage = kv_usage

    def load(self, target: WorkerKey) -> WorkerLoad:
        s = self._targets[target]
        if s.cached_load is not None:
            return s.cached_load
        in_flight, pending, decode, active = len(s.requests), s.pending_prefill_tokens, s.decode_blocks, s.active_blocks
        for peer in s.peers.values():  # replicas' requests load the same engine (none: one router)
            in_flight += peer.in_flight
            pending += peer.pending_prefill_tokens
            decode += peer.decode_blocks
            active += peer.active_blocks
        s.cached_load = WorkerLoad(
            in_flight=in_flight,
            running=s.engine_running,
            waiting=s.engine_waiting,
            queued_prefill_tokens=max(s.engine_queued_prefill_tokens, pending),
            active_blocks=active,
            kv_usage=s.kv_usage,
            decode_blocks=decode,
        )
        return s.cached_load

    # ------------------------------------------------------------------ router replicas

    def own_load(self) -> dict[WorkerKey, PeerTargetLoad]:
        """This router's own accounting per target, as a replica tells its peers (targets with
        nothing in flight included: a peer must see a count drop to 0)."""
        return {t: PeerTargetLoad(len(s.requests), s.pending_prefill_tokens, s.decode_blocks, s.active_blocks)
                for t, s in self._targets.items()}

    def set_peer_load(self, peer_id: str, loads: dict[WorkerKey, PeerTargetLoad]) -> None:
        """A replica's latest figures (replacing its previous ones): from now on each target's load
        counts that replica's requests too, as the engine will. Targets it does not list, or that
        this router does not know, count nothing from it."""
        for target, state in self._targets.items():
            new = loads.get(target)
            old = state.peers.get(peer_id)
            if new == old or (new is None and old is None):
                continue
            if new is None or new == _NO_PEER_LOAD:
                state.peers.pop(peer_id, None)
            else:
                state.peers[peer_id] = new
            state.cached_load = None
            self._dirty.add(target)

    def forget_peer(self, peer_id: str) -> None:
        """A replica that went silent (or stopped): its requests no longer count."""
        self.set_peer_load(peer_id, {})

    # ------------------------------------------------------------------ requests

    def request_hashes(self, request: RoutingInput) -> list[int]:
        return request_block_hashes(request.token_ids, block_size=self.block_size,
                                    lora_name=request.lora_name, cache_salt=request.cache_salt)

    def route(self, request: RoutingInput, *, now: float, exclude: Iterable[WorkerKey] = ()) -> RouteResult:
        """Choose a target, record the request in flight there, and predict its blocks there.

        ``exclude`` leaves out targets (a retry after a worker died). Raises ``NoTargetsError``
        when nothing is left, ``ValueError`` for an empty prompt or a request id in flight.
        """
        if not request.token_ids:
            raise ValueError("empty prompt")
        if request.request_id in self._requests:
            raise ValueError(f"request {request.request_id!r} is already in flight")
        hashes = self.request_hashes(request)
        excluded = set(exclude)
        choose_columns = getattr(self.policy, "choose_columns", None)
        if (choose_columns is not None and len(self._targets) >= COLUMNS_MIN_TARGETS and not excluded
                and request.pinned_worker_id is None):
            # The policy scores the fleet as columns: no WorkerState per candidate.
            masks = self.index.overlap_masks(hashes, now=now)
            self._refresh_base()
            if not self._base:
                raise NoTargetsError("no worker can take the request")
            route_request = RouteRequest(request.request_id, len(request.token_ids), hashes, request.token_ids,
                                         request.lora_name, request.max_tokens)
            raw_overlap: dict[WorkerKey, int] = {}
            decision = choose_columns(route_request, self._columns(masks, raw_overlap), now=now, rng=self.rng)
            chosen_overlap = raw_overlap.get(decision.target, decision.overlap_blocks)
        else:
            decision, chosen_overlap = self._choose(request, hashes, excluded, now)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %s", request.request_id, decision.explain())
        rec = self._dispatch(request, decision, chosen_overlap, hashes, now)
        if self.tentative_window_s > 0 and hashes:
            self.index.add_tentative(decision.target, hashes, now + self.tentative_window_s)
            shared = self._shared_routes
            if shared is not None and chosen_overlap < len(hashes):
                if len(shared) >= MAX_SHARED_ROUTES:  # nobody took them for long: the oldest go
                    del shared[: len(shared) // 2]
                shared.append((decision.target, hashes[chosen_overlap:]))
        return RouteResult(decision, rec, hashes)

    # ------------------------------------------------------------------ predictions shared by replicas

    def share_routes(self) -> None:
        """Keep each route's new blocks for ``take_shared_routes`` (a router with replicas)."""
        if self._shared_routes is None:
            self._shared_routes = []

    def take_shared_routes(self) -> list[tuple[WorkerKey, list[int]]]:
        """The predictions made since the last call, oldest first: ``(target, blocks it did not
        hold)``, the blocks another replica should predict there too."""
        taken = self._shared_routes
        if not taken:
            return []
        self._shared_routes = []
        return taken

    def predict_from_peer(self, target: WorkerKey, own_hashes: Sequence[int], *, now: float) -> bool:
        """Another replica routed a request's ``own_hashes`` to ``target``: predict them there as if
        this router had (for ``tentative_window_s`` from ``now``). False: an unknown target, or
        predict-on-route is off."""
        if self.tentative_window_s <= 0 or target not in self._targets or not own_hashes:
            return False
        self.index.add_tentative(target, own_hashes, now + self.tentative_window_s)
        return True

    def _choose(self, request: RoutingInput, hashes: list[int], excluded: set[WorkerKey],
                now: float) -> tuple[Decision, int]:
        """The policy's decision on the candidates as a list, and the chosen target's overlap."""
        overlap = self.index.overlap(hashes, now=now)
        candidates = self._candidates(overlap)
        if excluded or request.pinned_worker_id is not None:
            candidates = [w for w in candidates if w.target not in excluded]
            if request.pinned_worker_id is not None:
                candidates = [w for w in candidates if w.target.worker_id == request.pinned_worker_id][:1]
        if not candidates:
            raise NoTargetsError("no worker can take the request" + (" (pinned worker unknown)"
                                                                      if request.pinned_worker_id else ""))
        route_request = RouteRequest(request.request_id, len(request.token_ids), hashes, request.token_ids,
                                     request.lora_name, request.max_tokens)
        if request.pinned_worker_id is not None:
            w = candidates[0]
            decision = Decision(w.target, {w.target: 0.0}, "pinned by the request", "pinned", "pinned",
                                w.overlap_blocks)
        else:
            decision = self.policy.choose(route_request, candidates, now=now, rng=self.rng)
        return decision, overlap.get(decision.target, 0)

    def _refresh_base(self) -> None:
        """Bring ``_base`` (and the columns) up to date with the targets' load and confidence."""
        confidence = self.index.confidence
        if self._base_version != self.index.confidence_version:
            keys = sorted(self._targets)
            self._base = [WorkerState(k, 0, self.load(k), confidence(k), self._targets[k].capacity_blocks)
                          for k in keys]
            self._base_pos = {k: i for i, k in enumerate(keys)}
            self._base_version = self.index.confidence_version
            self._dirty.clear()
            self._cols = None
        elif self._dirty:
            cols = self._cols
            for k in self._dirty:
                i = self._base_pos.get(k)
                if i is not None:
                    w = self._base[i] = WorkerState(k, 0, self.load(k), confidence(k),
                                                    self._targets[k].capacity_blocks)
                    if cols is not None:
                        _write_row(cols, i, w)
            self._dirty.clear()

    def _columns(self, masks: list[tuple[int, int]], raw_overlap: dict[WorkerKey, int]) -> FleetColumns:
        """``_base`` as columns with this request's overlap (``masks``: ``PrefixIndex.overlap_masks``),
        scaled by trust; ``raw_overlap`` gets the unscaled overlap of each target it scaled."""
        base = self._base
        if self._cols is None:
            n = len(base)
            self._cols = cols = tuple(np.zeros(n, dtype=np.int64) for _ in range(6))
            for i, w in enumerate(base):
                _write_row(cols, i, w)
            target_slots = [self.index.slot_of(w[0]) for w in base]
            self._slot_pos = np.full(max(target_slots) + 1, -1, dtype=np.int64)
            self._slot_pos[target_slots] = np.arange(n, dtype=np.int64)
        overlap = np.zeros(len(base), dtype=np.int64)
        if masks:
            # One numpy assignment for all masks: a long conversation can end at a different depth
            # on each of many targets (one mask per depth).
            slots: list[int] = []
            depths: list[int] = []
            mask_slots = self.index.mask_slots
            for mask, blocks in masks:
                found = mask_slots(mask)
                slots += found
                depths += [blocks] * len(found)
            slot_pos = self._slot_pos
            if max(slots) >= len(slot_pos):  # slots of targets the index knows and the router does not
                slot_pos = np.concatenate([slot_pos, np.full(max(slots) + 1 - len(slot_pos), -1, dtype=np.int64)])
            rows = slot_pos[slots]
            known = rows >= 0
            overlap[rows[known]] = np.asarray(depths, dtype=np.int64)[known]
            for k, weight in self._trust.items():
                row = self._base_pos.get(k)
                if row is not None and overlap[row]:
                    raw_overlap[k] = blocks = int(overlap[row])
                    overlap[row] = int(blocks * weight)
        return FleetColumns(base, overlap, *self._cols)

    def _candidates(self, overlap: dict[WorkerKey, int]) -> list[WorkerState]:
        """Every target as a ``WorkerState`` (target order), with this request's overlap."""
        self._refresh_base()
        candidates = list(self._base)
        pos = self._base_pos
        new = tuple.__new__  # NamedTuple._replace is several times slower
        trust = self._trust
        for k, n in overlap.items():
            i = pos.get(k)
            if i is not None:
                if trust and k in trust:
                    n = int(n * trust[k])
                b = candidates[i]
                candidates[i] = new(WorkerState, (k, n, b[2], b[3], b[4]))
        return candidates

    def _dispatch(self, request: RoutingInput, decision: Decision, overlap_blocks: int, hashes: list[int],
                  now: float) -> InFlight:
        prompt = len(request.token_ids)
        usable = min(overlap_blocks, max(prompt - 1, 0) // self.block_size)
        predicted = usable * self.block_size
        rec = InFlight(request.request_id, decision.target, prompt, len(hashes), overlap_blocks, predicted, now,
                       prompt - predicted, hashes=hashes,
                       decode_blocks=decode_blocks_estimate(request.max_tokens, self.block_size))
        state = self._targets[decision.target]
        state.decode_blocks += rec.decode_blocks
        state.cached_load = None
        self._dirty.add(decision.target)
        state.requests[rec.request_id] = rec
        state.pending_prefill_tokens += rec.pending_prefill_tokens
        active = state.active_hashes
        active.update(hashes)
        state.active_blocks = len(active)
        self._requests[rec.request_id] = rec
        self.routed_total += 1
        self.predicted_cached_tokens_total += predicted
        return rec

    def in_flight(self, request_id: str) -> InFlight | None:
        return self._requests.get(request_id)

    def num_in_flight(self) -> int:
        return len(self._requests)

    def on_first_token(self, request_id: str, *, now: float) -> None:
        """The request's prefill is done: its tokens leave the target's pending prefill."""
        rec = self._requests.get(request_id)
        if rec is None or rec.first_token_at is not None:
            return
        rec.first_token_at = now
        state = self._targets.get(rec.target)
        if state is not None:
            state.cached_load = None
            self._dirty.add(rec.target)
            state.pending_prefill_tokens -= rec.pending_prefill_tokens
        rec.pending_prefill_tokens = 0

    def on_finish(self, request_id: str) -> InFlight | None:
        """The request ended (done, error or cancelled); returns its record, or None if unknown."""
        rec = self._requests.pop(request_id, None)
        if rec is None:
            return None
        state = self._targets.get(rec.target)
        if state is not None:
            state.cached_load = None
            self._dirty.add(rec.target)
            state.requests.pop(request_id, None)
            state.pending_prefill_tokens -= rec.pending_prefill_tokens
            state.decode_blocks -= rec.decode_blocks
            active = state.active_hashes
            get = active.get
            for h in rec.hashes:
                n = get(h, 0)
                if n > 1:
                    active[h] = n - 1
                elif n:
                    del active[h]
            state.active_blocks = len(active)
        return rec

    def expire(self, now: float) -> None:
        """Periodic upkeep: tentative entries and parked orphans past their time."""
        self.index.expire(now)
