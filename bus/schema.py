"""Wire schema of kvr's own channels (everything except vLLM's KV events).

Every message is a msgspec Struct in a tagged union, msgpack on the wire, one
ZMQ frame per message (after the ROUTER identity frame). One typed decoder per
channel (``bus/codec.py``) turns bytes into exactly these types or raises one
``DecodeError``; dicts never get past ``bus/``.

Channels::

    client  DEALER ──ClientMessage──▶  ROUTER router   (requests, cancels)
    client  DEALER ◀─ReplyMessage────  ROUTER router   (routed, tokens, done / error)
    worker  DEALER ──WorkerMessage──▶  ROUTER router   (hello, heartbeat, tokens, done / error, reply batch)
    worker  DEALER ◀─RouterMessage───  ROUTER router   (welcome, heartbeat, dispatch, cancel)
    router/worker PUB ──MetricsRecord──▶ SUB monitor  (topic ``names.metrics_topic(...)``)

Invariants:
* every ``GenerateRequest`` the router accepts ends in exactly one terminal reply
  to its client: ``Completion`` or ``ErrorReply`` (tokens and ``Routed`` may precede it);
* request ids are chosen by the client and unique per client connection;
* times are seconds (``_s``), token counts ``_tokens``, block counts ``_blocks``.
"""

from __future__ import annotations

import enum

import msgspec

from core.metrics import RequestRecord as RequestRecord  # the one record of a request; on the wire here

#: Bump when a change is not backwards compatible; peers with another version are refused.
#: 2: numbered reply streams (``TokenChunk.seq``, ``Completion.chunks``) and worker links that prove
#: their incarnation (``Hello.link_token``); a version-1 worker would be refused as a duplicate on
#: its first reconnect, so it is refused at once instead.
PROTOCOL_VERSION = 2


# Not enum.StrEnum: that changes str()/format() of a member from "ErrorCode.TIMEOUT" to "timeout",
# and codes reach logs and messages through many variables (bench/echo.py formats msg.code).
class ErrorCode(str, enum.Enum):  # noqa: UP042
    """Why a request ended without a result."""

    BAD_REQUEST = "bad_request"  # malformed or invalid fields (the message says which)
    PROMPT_TOO_LONG = "prompt_too_long"
    UNKNOWN_MODEL = "unknown_model"
    NO_WORKERS = "no_workers"  # nothing alive that serves the model
    WORKER_DIED = "worker_died"  # the worker died after tokens were streamed
    WORKER_ERROR = "worker_error"
    OVERLOADED = "overloaded"  # admission control refused it
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    ROUTER_RESTARTED = "router_restarted"
    INTERNAL = "internal"


# ----------------------------------------------------------------------------- shared parts


class WorkerLoad(msgspec.Struct, frozen=True):
    """A worker's load as its engine sees it (sent with every heartbeat)."""

    running: int = 0
    waiting: int = 0
    queued_prefill_tokens: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use (not free), 0..1
    num_free_blocks: int = 0
    num_gpu_blocks: int = 0


class RequestStats(msgspec.Struct, frozen=True):
    """Per-request timings measured by the engine (engine time, not wall clock at the router)."""

    queue_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    e2e_s: float = 0.0
    preemptions: int = 0


# ----------------------------------------------------------------------------- client ⇄ router


class GenerateRequest(msgspec.Struct, tag="generate", frozen=True):
    """A completion request. Exactly one of ``prompt`` / ``token_ids``."""

    request_id: str
    prompt: str | None = None
    token_ids: list[int] | None = None
    # None: no cap, the engine stops at end of sequence or its context (vLLM's chat default);
    # dispatched to a worker as 0, the worker protocol's "no cap".
    max_tokens: int | None = 16
    model: str | None = None
    lora_name: str | None = None
    cache_salt: str | None = None
    stream: bool = True
    # Optional: route to this worker (debugging, sticky sessions); the policy is skipped.
    worker_id: str | None = None


class CancelRequest(msgspec.Struct, tag="cancel", frozen=True):
    request_id: str


class Routed(msgspec.Struct, tag="routed", frozen=True):
    """The router's decision, sent before any token."""

    request_id: str
    worker_id: str
    dp_rank: int
    overlap_blocks: int
    predicted_cached_tokens: int
    policy: str
    reason: str = ""


class TokenChunk(msgspec.Struct, tag="tokens", frozen=True):
    request_id: str
    token_ids: list[int]
    text: str = ""
    #: This chunk's place in its request's stream (0, 1, 2...), stamped by the worker service on the
    #: router link. The router relays chunks in this order only: a repeat (a worker resending its
    #: stream after a reconnect) is dropped, a gap ends the request with an explicit error. -1: not
    #: numbered (not checked; a client never sees -1 from a version-2 worker).
    seq: int = -1


class Completion(msgspec.Struct, tag="done", frozen=True):
    """Terminal success. ``cached_tokens`` is the engine's truth; the router adds its prediction."""

    request_id: str
    worker_id: str
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    finish_reason: str = "length"
    stats: RequestStats = RequestStats()
    predicted_cached_tokens: int = -1  # filled in by the router; -1 = unknown
    dp_rank: int = 0
    retries: int = 0
    #: How many ``TokenChunk``s the worker sent before this (stamped by the worker service). The
    #: router says done only when it relayed exactly that many; otherwise the client gets an
    #: ``ErrorReply`` instead (never a result with missing tokens). -1: not counted.
    chunks: int = -1


class ErrorReply(msgspec.Struct, tag="error", frozen=True):
    """Terminal failure, with a reason a person can act on."""

    request_id: str
    code: ErrorCode
    message: str
    worker_id: str | None = None


ClientMessage = GenerateRequest | CancelRequest
ReplyMessage = Routed | TokenChunk | Completion | ErrorReply
TERMINAL_REPLIES = (Completion, ErrorReply)


# ----------------------------------------------------------------------------- worker ⇄ router


class Hello(msgspec.Struct, tag="hello", frozen=True):
    """A worker (re)registers. ``epoch`` changes on every worker start (its incarnation)."""

    worker_id: str
    epoch: int
    model: str
    block_size: int
    num_gpu_blocks: int
    events_endpoint: str  # where the router SUBscribes (vLLM's PUB; connect or bind per vLLM rule)
    replay_endpoint: str | None = None
    topic: str = ""
    dp_size: int = 1  # ranks 0..dp_size-1 publish on port offsets of both endpoints, as vLLM
    http_url: str | None = None
    profile: str = ""
    engine: str = "emulated"  # or "vllm"
    protocol_version: int = PROTOCOL_VERSION
    # z85 public key of the KV-event PUB and replay ROUTER when they are CURVE servers (the
    # router's SUB then dials them as a CURVE client); "" = plain sockets (real vLLM).
    events_curve_key: str = ""
    # Longest sequence (prompt + output) the engine takes; 0 = unknown. The router refuses a
    # prompt no registered worker could hold (PROMPT_TOO_LONG) instead of dispatching it.
    max_model_len: int = 0
    #: A random secret of this incarnation, sent only on the router link and never stored (not in
    #: Redis, unlike the epoch): a Hello on a new connection that repeats it is the same process
    #: reconnecting, and takes its requests over; any other claimant of a live worker's id is
    #: refused (``Refused.code == REFUSED_DUPLICATE_ID``). "" = none (never proves anything).
    link_token: str = ""
    #: The router requests this worker still has (running, or finished with results the router may
    #: not have got), all dispatched by the router incarnation ``router_epoch`` (0: none yet). On a
    #: replaced link the router fails or re-routes its requests that are not listed (their Dispatch
    #: or result was lost with the old connection) and cancels the listed ones it no longer waits for.
    in_flight: list[str] = []
    router_epoch: int = 0


class Heartbeat(msgspec.Struct, tag="heartbeat", frozen=True):
    """Both directions. Workers attach their load; the router sends bare beats."""

    sender_id: str
    epoch: int = 0
    load: WorkerLoad | None = None
    dp_rank: int = 0
    #: Router → worker: False means "you are not registered with me" (the router restarted, or
    #: declared the worker dead while it was stalled): the worker says Hello again at once.
    known: bool = True


class Goodbye(msgspec.Struct, tag="goodbye", frozen=True):
    """A worker leaving cleanly (in-flight requests are answered first)."""

    worker_id: str
    epoch: int = 0


class Welcome(msgspec.Struct, tag="welcome", frozen=True):
    router_id: str
    heartbeat_interval_s: float
    heartbeat_liveness: int
    protocol_version: int = PROTOCOL_VERSION
    #: The router's incarnation; its heartbeats carry it as ``epoch``. A worker that hears
    #: another one (the router restarted and does not know it) says Hello again at once.
    router_epoch: int = 0
    #: The router reads ``ReplyBatch``; a router that leaves this False (an older one) gets every
    #: reply as its own message.
    reply_batches: bool = False


#: ``Refused.code``: the worker id is held by another live connection. ``retry_after_s`` is how long
#: before the holder would be declared dead if it is silent: a restarted worker whose predecessor
#: died says Hello once more then; refused again, the holder is alive and the worker gives up.
REFUSED_DUPLICATE_ID = "duplicate_id"
#: ``Refused.code``: CURVE is on and the worker id is bound to another public key (final).
REFUSED_KEY_MISMATCH = "key_mismatch"


class Refused(msgspec.Struct, tag="refused", frozen=True):
    """Registration refused (bad block size, protocol version, auth, a worker id in use...)."""

    reason: str
    code: str = ""  # "" (final), REFUSED_DUPLICATE_ID or REFUSED_KEY_MISMATCH
    retry_after_s: float = 0.0


#: ``Dispatch.max_tokens`` of a request without a cap: the engine stops at end of sequence or at
#: its context (the emulated engine draws a natural length; vLLM is sent no ``max_tokens``).
NO_CAP = 0


class Dispatch(msgspec.Struct, tag="dispatch", frozen=True):
    """Run this request. Token ids are already tokenized by the router."""

    request_id: str
    token_ids: list[int]
    max_tokens: int  # >= 1, or NO_CAP
    dp_rank: int = 0
    lora_name: str | None = None
    cache_salt: str | None = None


class Cancel(msgspec.Struct, tag="cancel", frozen=True):
    request_id: str


class ReplyBatch(msgspec.Struct, tag="batch", frozen=True):
    """Replies a worker has at once (one engine step's tokens for every running request, as vLLM's
    engine core sends a step's outputs together), in one message: the router takes one wake-up,
    one receive and one decode per step instead of per request. Each is handled as if sent alone,
    in order. Sent only to a router whose ``Welcome`` says ``reply_batches``."""

    replies: list[TokenChunk | Completion | ErrorReply]


#: Replies per ``ReplyBatch`` at most (~100 bytes each: far below any router's message limit).
MAX_REPLY_BATCH = 256

WorkerMessage = Hello | Heartbeat | Goodbye | TokenChunk | Completion | ErrorReply | ReplyBatch
RouterMessage = Welcome | Refused | Heartbeat | Dispatch | Cancel


# ----------------------------------------------------------------------------- metrics stream


class MirrorStatus(msgspec.Struct, frozen=True):
    """The router's Redis mirror health (``router/mirror_health.py`` defines states and causes)."""

    state: str = "ok"  # "ok" | "degraded"
    cause: str | None = None  # while degraded: unreachable, out_of_memory, auth, other
    since_s: float | None = None  # wall time the state began
    failed_writes: int = 0  # Redis writes that failed since the degradation began


class WorkerSample(msgspec.Struct, tag="worker", frozen=True):
    """A worker's state at one time (from its heartbeat and the router's index)."""

    worker_id: str
    t_s: float
    load: WorkerLoad
    indexed_blocks: int = 0
    confidence: str = "fresh"
    events_applied: int = 0
    event_lag_s: float = 0.0
    gaps: int = 0
    replays: int = 0
    resets: int = 0
    evictions: int = 0
    mirror: MirrorStatus | None = None  # the publishing router's Redis mirror (None: it has none)
    trust: float = 1.0  # the router's trust in the target's index claims (core/trust.py; 1: full)
    router_id: str = ""  # the publishing router (replicas of one fleet each publish their own view)


MetricsRecord = RequestRecord | WorkerSample


# ----------------------------------------------------------------------------- router ⇄ router replicas


class PeerTargetEntry(msgspec.Struct, array_like=True, frozen=True):
    """One target's figures in a ``PeerLoad`` (array-like: a fleet's worth goes out many times a second)."""

    worker_id: str
    dp_rank: int
    in_flight: int
    pending_prefill_tokens: int
    decode_blocks: int
    active_blocks: int


class PeerRoute(msgspec.Struct, array_like=True, frozen=True):
    """Blocks one replica just predicted on a target (predict-on-route): a routed request's blocks
    that the target did not hold yet, as kvr block hashes (uint64, ``core/own_block_hash.py``)."""

    worker_id: str
    dp_rank: int
    block_hashes: list[int]


class PeerLoad(msgspec.Struct, tag="peer_load", frozen=True):
    """What one router replica has in flight on each target, published on its metrics PUB
    (topic ``names.PEER_LOAD_TOPIC``) for the other replicas (``router/peers.py``). Each message
    replaces that replica's previous one; ``seq`` orders them within one ``epoch``. ``routes``: the
    blocks it predicted since its previous message (each is sent once; the others predict them too,
    so two replicas do not place one new prefix on two workers before its first KV event)."""

    router_id: str
    epoch: int
    seq: int
    targets: list[PeerTargetEntry]
    routes: list[PeerRoute] = []
