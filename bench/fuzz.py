"""``kvr bench fuzz``: every decoder at a socket edge, fed mutated and random input.

A :class:`Target` is one decoder as the service calls it, with the one error type it may raise
on bad input. A case is generated from valid seed messages by a seeded mutator
(:func:`make_case`): structure-aware tree mutations (wrong types, missing and unknown fields,
boundary and huge integers, negative numbers, nested garbage, wrong tags), byte mutations
(truncation, bit flips, splices, inserted bytes), hostile headers (deep nesting, lengths that
promise gigabytes) and raw random bytes. The property (:func:`run_case`): the decoder returns a
valid value of its type, or raises its documented error; any other exception is a crash. A case
slower than :data:`SLOW_CASE_S` counts as a hang.

Targets (``TARGETS``):

* ``vllm_events``: vLLM KV-event payloads (``bus.vllm_codec.VllmEventDecoder``), every release's form;
* ``client`` / ``worker`` / ``router`` / ``reply`` / ``metrics``: the msgspec channel decoders of
  ``bus/codec.py`` on each side; a decoded ``GenerateRequest`` also goes through the router's
  admission check (``core.admission.check_request``), which must answer, not raise, and a client
  frame that does not decode through ``salvage_request_id`` (whom the router answers);
* ``kv_stream``: multipart frames of the live SUB and the replay DEALER into the subscriber's
  frame parsing and ``EventStream`` state machine (seq frames, end markers, payloads);
* ``replay_request``: a worker's replay ROUTER answering request frames (``EventPublisher._serve``);
* ``http_completions``: the router's HTTP front body decoder (``router.http_front.parse_completion_body``);
  a request it accepts must also cross the bridge: encode, decode on the client channel, pass admission;
* ``http_worker``: the emulated worker's vLLM API bodies (``worker.http_api.completion_params``), then
  its engine's admission (``RequestRejected`` is the worker's 400).

The hypothesis tests (tests/bus/test_fuzz_decoders.py) run the same targets with fewer cases.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import msgspec

from bench.progress import NullProgress
from bench.results import SuiteResult

logger = logging.getLogger(__name__)

SLOW_CASE_S = 1.0  # one decode this slow is a hang for the report (typical cases take microseconds)
_MSGPACK_INTS = (0, 1, -1, 2, 15, 16, 127, 128, 255, 256, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53,
                 2**63 - 1, 2**63, 2**64 - 1, -(2**31), -(2**32), -(2**63))
_WIDE_INTS = (2**64, 2**100, -(2**64), 10**400)  # JSON carries them; msgpack cannot
_FLOATS = (0.0, -0.0, 1.5, -1.0, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan)
_STRINGS = ("", "a", "generate", "hello", "done", "error", "BlockStored", "BlockRemoved", "AllBlocksCleared",
            "type", "request_id", "\x00", "é", "🙂" * 3, "x" * 300, "\u202e", "null", "-1")


@dataclass
class Target:
    """One decoder at a socket edge: ``run(case)`` returns a valid value or raises ``expected``."""

    name: str
    edge: str
    run: Callable[[Any], Any]
    expected: tuple[type[BaseException], ...]
    seeds: Callable[[random.Random], list[Any]]
    kind: str = "msgpack"  # how cases are built: msgpack | json | frames | request_frames


# ----------------------------------------------------------------------------- garbage


def garbage(rng: random.Random, *, wide: bool = False, depth: int = 0) -> Any:
    """A random JSON/msgpack-able value: boundary scalars and nested containers."""
    k = rng.randrange(14 if depth < 3 else 9)
    if k == 0:
        return None
    if k == 1:
        return rng.random() < 0.5
    if k == 2:
        return rng.choice(_MSGPACK_INTS + (_WIDE_INTS if wide else ()))
    if k == 3:
        return rng.randint(-(2**63), 2**64 - 1) if not wide else rng.randint(-(2**80), 2**80)
    if k == 4:
        return rng.choice(_FLOATS)
    if k == 5:
        return rng.choice(_STRINGS)
    if k == 6:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(12)))
    if k == 7:
        return rng.randbytes(rng.randrange(70)) if not wide else rng.randbytes(8).hex()
    if k == 8:
        return rng.randrange(-5, 40)
    if k in (9, 10):
        return [garbage(rng, wide=wide, depth=depth + 1) for _ in range(rng.randrange(5))]
    if k == 11:
        return [rng.choice(_MSGPACK_INTS) for _ in range(rng.randrange(1, 40))]
    return {rng.choice(_STRINGS[:12]) if rng.random() < 0.5 else str(garbage(rng, depth=9)):
            garbage(rng, wide=wide, depth=depth + 1) for _ in range(rng.randrange(5))}


def _nodes(obj: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += _nodes(value, path + (key,))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            out += _nodes(value, path + (i,))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def mutate_tree(rng: random.Random, obj: Any, *, wide: bool = False) -> Any:
    """One structural mutation of a decoded message (a fresh copy is mutated in place)."""
    nodes = _nodes(obj)
    path = rng.choice(nodes)
    op = rng.randrange(8)
    if not path:  # the root itself
        if op < 3:
            return garbage(rng, wide=wide)
        return [obj] if op < 5 else ({"type": obj} if op < 6 else obj)
    parent, key = _get(obj, path[:-1]), path[-1]
    if op <= 2:
        parent[key] = garbage(rng, wide=wide)  # wrong type, boundary int, nested garbage
    elif op == 3:
        del parent[key]  # a missing field (maps) or a shorter array (positional forms)
    elif op == 4:
        if isinstance(parent, dict):
            parent[rng.choice(_STRINGS[:12])] = garbage(rng, wide=wide)  # unknown or duplicate-named field
        else:
            parent.insert(rng.randrange(len(parent) + 1), garbage(rng, wide=wide))
    elif op == 5:
        value = parent[key]
        if isinstance(value, int) and not isinstance(value, bool):  # sign flip, off by one, the next boundary
            parent[key] = rng.choice((-value, value - 1, value + 1, -1, 2**63 if not wide else 2**70))
        else:
            parent[key] = rng.choice(_STRINGS)
    elif op == 6:
        parent[key] = [[[parent[key]]]]  # wrapped in nesting
    else:
        value = parent[key]
        if isinstance(value, dict):
            parent[key] = list(value.values())
        elif isinstance(value, list):
            parent[key] = {str(i): v for i, v in enumerate(value)}
        else:
            parent[key] = str(value)
    return obj


def mutate_bytes(rng: random.Random, data: bytes, other: bytes) -> bytes:
    """Byte-level damage: truncation, bit flips, overwrites, inserts, splices."""
    b = bytearray(data)
    op = rng.randrange(6)
    if op == 0 or not b:
        return bytes(b[: rng.randrange(len(b) + 1)])  # truncated
    if op == 1:
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if op == 2:
        i = rng.randrange(len(b))
        b[i : i + 4] = rng.randbytes(4)
        return bytes(b)
    if op == 3:
        i = rng.randrange(len(b) + 1)
        return bytes(b[:i] + rng.choice((b"\xc1", b"\xdd\xff\xff\xff\xff", b"\xdb\x7f\xff\xff\xff",
                                         b"\xcf" + b"\xff" * 8, b"\xd3\x80" + b"\x00" * 7,
                                         rng.randbytes(rng.randrange(1, 9)))) + b[i:])
    if op == 4:
        i, j = rng.randrange(len(b) + 1), rng.randrange(len(other) + 1)
        return bytes(b[:i]) + other[j:]  # spliced with another message
    i = rng.randrange(len(b))
    return bytes(b[:i] + b[i + 1 :])


def hostile_msgpack(rng: random.Random) -> bytes:
    """Headers that promise more than they hold, and deep nesting."""
    depth = rng.choice((100, 1000, 100_000))
    return rng.choice((
        b"\x91" * depth + b"\xc0",  # arrays of one array...
        b"\x81\xa1a" * depth + b"\xc0",  # maps of one map...
        b"\xdd\xff\xff\xff\xff",  # an array32 of 4 G elements, then nothing
        b"\xdf\xff\xff\xff\xff" + b"\xa1a\xc0" * 10,  # a map32 of 4 G pairs
        b"\xdb\xff\xff\xff\xff" + b"a" * 10,  # a str32 of 4 GB
        b"\xc6\xff\xff\xff\xff",  # a bin32 of 4 GB
        b"\x93\xcb" + b"\x7f\xf8" + b"\x00" * 6 + b"\x90\xc0",  # ts NaN, no events
        b"\xc7\x05\x01hello",  # an ext type
        b"",
    ))


def make_case(rng: random.Random, target: Target, seeds: list[Any]) -> Any:
    """One fuzz input for ``target``, from its seeds."""
    if target.kind == "frames":
        return _stream_case(rng, seeds)
    if target.kind == "request_frames":
        return _replay_request_case(rng)
    seed = rng.choice(seeds)
    r = rng.random()
    if target.kind == "json":
        if r < 0.05:
            return seed
        if r < 0.6:
            obj = json.loads(seed)
            for _ in range(rng.randrange(1, 4)):
                obj = mutate_tree(rng, obj, wide=True)
            return json.dumps(obj).encode()  # NaN, Infinity and huge ints included: Python's json reads them
        if r < 0.85:
            return mutate_bytes(rng, seed, rng.choice(seeds))
        if r < 0.95:
            return rng.choice((b"[" * 100_000, b"{\"a\":" * 50_000, b"\"\\ud800\"", b"1" * 5000, b"\xff\xfe",
                               b"{\"prompt\": \"\\ud800\"}", b"{\"messages\": [{\"content\": \"\\udfff\"}]}"))
        return rng.randbytes(rng.randrange(64))
    if r < 0.05:
        return seed  # valid input must decode
    if r < 0.55:
        obj = msgspec.msgpack.decode(seed)
        for _ in range(rng.randrange(1, 4)):
            obj = mutate_tree(rng, obj)
        try:
            return msgspec.msgpack.encode(obj)
        except (OverflowError, TypeError, ValueError):
            return seed
    if r < 0.85:
        return mutate_bytes(rng, seed, rng.choice(seeds))
    if r < 0.93:
        return hostile_msgpack(rng)
    return rng.randbytes(rng.randrange(96))


# ----------------------------------------------------------------------------- seeds


def _vllm_seeds(rng: random.Random) -> list[bytes]:
    from bus.vllm_codec import encode_batch
    from core.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

    out = []
    for i in range(24):
        n = rng.randrange(1, 4)
        hashes: list = [rng.getrandbits(64) for _ in range(n)] if i % 4 else [rng.randbytes(32) for _ in range(n)]
        parent = None if i % 2 else rng.getrandbits(64)
        events = [BlockStored(hashes, parent, list(range(16 * n)), 16, None, "GPU", None),
                  BlockRemoved(hashes[:1], "GPU"), AllBlocksCleared()]
        batch = KVEventBatch(rng.random() * 1e9, events[: rng.randrange(1, 4)], rng.choice((None, 0, 1)))
        out.append(encode_batch(batch, legacy=i % 3 == 0))
    return out


def _client_seeds(rng: random.Random) -> list[bytes]:
    from bus.codec import encode
    from bus.schema import CancelRequest, GenerateRequest

    return [encode(m) for m in (
        GenerateRequest("r1", token_ids=[1, 2, 3, 4], max_tokens=8),
        GenerateRequest("r2", prompt="hello world", max_tokens=16, model="m", lora_name="l", cache_salt="s",
                        stream=False, worker_id="w1"),
        GenerateRequest("r3", prompt="x", token_ids=[5]),
        CancelRequest("r1"),
    )]


def _load():
    from bus.schema import RequestStats, WorkerLoad

    return WorkerLoad(running=1, waiting=2, queued_prefill_tokens=300, kv_usage=0.5, num_free_blocks=10,
                      num_gpu_blocks=100), RequestStats(0.1, 0.2, 0.3, 0.4, 0.5, 1)


def _worker_seeds(rng: random.Random) -> list[bytes]:
    from bus.codec import encode
    from bus.schema import Completion, ErrorCode, ErrorReply, Goodbye, Heartbeat, Hello, ReplyBatch, TokenChunk

    load, stats = _load()
    return [encode(m) for m in (
        Hello(worker_id="w1", epoch=3, model="m", block_size=16, num_gpu_blocks=1000, events_endpoint="tcp://h:1",
              replay_endpoint="tcp://h:2", topic="kv", dp_size=2, http_url="http://h:3", profile="p",
              max_model_len=4096),
        Heartbeat("w1", 3, load, 1), Heartbeat("w1"), Goodbye("w1", 3), TokenChunk("r-1", [1, 2], "ab"),
        Completion("r-1", "w1", 10, 8, 2, "stop", stats, -1, 0, 0),
        ErrorReply("r-1", ErrorCode.PROMPT_TOO_LONG, "too long", "w1"),
        ReplyBatch([TokenChunk("r-1", [3], "c", 1), TokenChunk("r-2", [4], "d", 0),
                    Completion("r-1", "w1", 10, 8, 2, "stop", stats, -1, 0, 0, chunks=2)]),
    )]


def _router_seeds(rng: random.Random) -> list[bytes]:
    from bus.codec import encode
    from bus.schema import Cancel, Dispatch, Heartbeat, Refused, Welcome

    return [encode(m) for m in (
        Welcome("r", 0.5, 3), Welcome("r", 0.5, 3, reply_batches=True), Refused("block size"), Heartbeat("r"),
        Dispatch("r-1", [1, 2, 3], 8, 1, "l", "s"),
        Cancel("r-1"),
    )]


def _reply_seeds(rng: random.Random) -> list[bytes]:
    from bus.codec import encode
    from bus.schema import Completion, ErrorCode, ErrorReply, Routed, TokenChunk

    _, stats = _load()
    return [encode(m) for m in (
        Routed("r1", "w1", 0, 3, 48, "kvr", "hit"), TokenChunk("r1", [1], "a"),
        Completion("r1", "w1", 10, 8, 2, "length", stats, 16, 1, 1), ErrorReply("r1", ErrorCode.NO_WORKERS, "none"),
    )]


def _metrics_seeds(rng: random.Random) -> list[bytes]:
    from bus.codec import encode
    from bus.schema import ErrorCode, RequestRecord, WorkerSample

    load, stats = _load()
    return [encode(m) for m in (
        RequestRecord(request_id="r1", worker_id="w1", arrival_s=1.0, ttft_s=0.1, e2e_s=1.0, prompt_tokens=10,
                      cached_tokens=8, output_tokens=2, predicted_cached_tokens=8, policy="kvr",
                      queue_s=stats.queue_s, prefill_s=stats.prefill_s, preemptions=stats.preemptions),
        RequestRecord(request_id="r2", worker_id=None, arrival_s=1.0, ttft_s=0.0, e2e_s=1.0, prompt_tokens=10,
                      cached_tokens=0, output_tokens=0, predicted_cached_tokens=0, policy="kvr",
                      error=ErrorCode.TIMEOUT.value),
        WorkerSample("w1/0", 1.0, load, 10, "fresh", 3, 0.01, 1, 1, 0, 2),
    )]


def _http_seeds(rng: random.Random) -> list[bytes]:
    return [json.dumps(b).encode() for b in (
        {"model": "m", "prompt": "hello world", "max_tokens": 8},
        {"prompt": [1, 2, 3, 4], "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}},
        {"prompt": ["a batch of one"], "max_completion_tokens": 3, "cache_salt": "s", "n": 1},
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": [{"type": "text", "text": "x"}]}],
         "max_tokens": 2, "chat": True},
    )]


# ----------------------------------------------------------------------------- runners


def _typed(decode: Callable[[bytes], Any], types: tuple[type, ...]) -> Callable[[bytes], Any]:
    """``decode``, checked to return one of ``types`` (anything else is a crash)."""

    def run(frame: bytes) -> Any:
        msg = decode(frame)
        if not isinstance(msg, types):
            raise AssertionError(f"decoded to {type(msg).__name__}")
        return msg

    return run


def _channel(factory_name: str, type_names: tuple[str, ...]) -> Callable[[bytes], Any]:
    from bus import codec, schema

    return _typed(getattr(codec, factory_name)().decode, tuple(getattr(schema, n) for n in type_names))


def _client_run() -> Callable[[bytes], Any]:
    from bus.codec import DecodeError, salvage_request_id
    from core.admission import AdmissionLimits, check_request

    decode, limits = _channel("client_decoder", ("GenerateRequest", "CancelRequest")), AdmissionLimits()

    def run(frame: bytes) -> Any:
        try:
            msg = decode(frame)
        except DecodeError:
            rid = salvage_request_id(frame)  # what the router does next with a bad frame: find whom to answer
            if rid is not None and not isinstance(rid, str):
                raise AssertionError(f"salvaged a {type(rid).__name__}") from None
            raise
        if hasattr(msg, "token_ids"):  # the router's very next step: admission must answer, not raise
            check_request(request_id=msg.request_id, prompt=msg.prompt, token_ids=msg.token_ids,
                          max_tokens=msg.max_tokens, model=msg.model, limits=limits)
        return msg

    return run


def _vllm_run() -> Callable[[bytes], Any]:
    from bus.vllm_codec import VllmEventDecoder
    from core.events import KVEventBatch

    return _typed(VllmEventDecoder().decode, (KVEventBatch,))


def _http_run() -> Callable[[bytes], Any]:
    from bus.codec import client_decoder, encode
    from core.admission import AdmissionLimits, check_request
    from router.http_front import parse_completion_body

    decoder, limits = client_decoder(), AdmissionLimits()

    def run(raw: bytes) -> Any:
        chat = b'"messages"' in raw[:4096]
        req = parse_completion_body(raw, chat=chat, request_id="cmpl-1", alias="kvr")
        # What the bridge does with it next: encode, the router decodes and admits (or refuses).
        back = decoder.decode(encode(req))
        check_request(request_id=back.request_id, prompt=back.prompt, token_ids=back.token_ids,
                      max_tokens=back.max_tokens, model=back.model, limits=limits)
        return req

    return run


def _http_worker_run() -> Callable[[bytes], Any]:
    from core.engine import EmulatedEngine, EngineRequest
    from core.profiles import get_profile
    from core.tokenizer import BuiltinTokenizer
    from worker.http_api import completion_params, decode_json_body

    engine = EmulatedEngine(profile_or_config=get_profile("simple"), rng=random.Random(0))
    tokenizer = BuiltinTokenizer()

    def run(raw: bytes) -> Any:
        chat = b'"messages"' in raw[:4096]
        ids, max_tokens, salt = completion_params(decode_json_body(raw), chat=chat, tokenizer=tokenizer)
        # What the worker does next (EmulatedBackend.submit): the engine admits it or says why not (a 400).
        engine.add_request(EngineRequest("fuzz", ids, max_tokens if max_tokens > 0 else None, None, salt), now=0.0)
        engine.abort("fuzz", now=0.0)
        return ids

    return run


class _StreamHarness:
    """The subscriber's frame parsing (live SUB and replay DEALER) over the real ``EventStream``, no sockets."""

    def __init__(self) -> None:
        from bus.event_stream import EventStream
        from bus.subscriber import EventSubscriber
        from bus.vllm_codec import VllmEventDecoder

        class Harness(EventStream):
            _on_live_frames = EventSubscriber._on_live_frames
            _on_replay_frames = EventSubscriber._on_replay_frames
            _bad_frames = EventSubscriber._bad_frames

            def _send_replay_request(self, start: int) -> None:
                self.replay_requests.append(start)

        self._cls, self._decoder = Harness, VllmEventDecoder()
        self.now = 0.0

    def run(self, messages: list[tuple[str, list[bytes]]]) -> list:
        s = self._cls(name="fuzz", has_replay=True, expected_seq=None, replay_timeout_s=1.0, max_replay_attempts=2,
                      max_pending=64, digest_window=64, decoder=self._decoder, clock=lambda: self.now)
        s._topic, s.replay_requests = b"kv", []
        s.start()
        items = []
        for channel, frames in messages:
            if channel == "live":
                s._on_live_frames(frames)
            elif channel == "replay":
                s._on_replay_frames(frames)
            elif channel == "connect":
                s.on_connected()
            else:
                self.now += 2.0  # a replay deadline passes
                s.on_timer()
            items += s.take()
        return items


def _seq(rng: random.Random, near: int) -> bytes:
    v = rng.choice((near, near + 1, near - 1, 0, 2**63, 2**64 - 2, rng.getrandbits(64), near + rng.randrange(100)))
    return (v % 2**64).to_bytes(8, "big")


def _stream_case(rng: random.Random, seeds: list[bytes]) -> list[tuple[str, list[bytes]]]:
    out, seq = [], rng.randrange(5)
    for _ in range(rng.randrange(1, 12)):
        channel = rng.choice(("live", "live", "live", "replay", "replay", "connect", "timer"))
        payload = rng.choice(seeds)
        if rng.random() < 0.4:
            payload = mutate_bytes(rng, payload, rng.choice(seeds))
        topic = rng.choice((b"kv", b"kv", b"kv@w1", b"", b"other", rng.randbytes(3)))
        seq_frame = _seq(rng, seq) if rng.random() < 0.9 else rng.randbytes(rng.choice((0, 1, 7, 9, 16)))
        if channel == "live":
            frames = [topic, seq_frame, payload]
        elif channel == "replay":
            end = rng.random() < 0.2
            frames = ([b"", topic, b"\xff" * 8 if end else seq_frame, b"" if end else payload] if rng.random() < 0.6
                      else [b"", b"\xff" * 8 if end else seq_frame, b"" if end else payload])
        else:
            frames = []
        if frames and rng.random() < 0.15:  # wrong frame count, or a non-empty delimiter
            frames = rng.choice((frames[:-1], frames + [b"x"], [rng.randbytes(2)] + frames[1:], []))
        out.append((channel, frames))
        seq += 1
    return out


class _ReplayHarness:
    """A worker's replay ROUTER (``EventPublisher._serve``) with its ring and no sockets."""

    def __init__(self) -> None:
        from bus.publisher import EventPublisher, PublisherCounters

        class Router:
            def __init__(self) -> None:
                self.sent = 0

            def send_multipart(self, frames: list[bytes]) -> None:
                self.sent += 1

        self._serve = EventPublisher._serve
        pub = object.__new__(EventPublisher)
        pub._ring = deque(((seq, b"\x93\xcb" + bytes(8) + b"\x90\xc0") for seq in range(40, 56)), maxlen=16)
        pub._router, pub.topic, pub.counters, pub.reply_format = Router(), b"kv", PublisherCounters(), "0.33"
        self.pub = pub

    def run(self, frames: list[bytes]) -> int:
        self._serve(self.pub, frames)
        return self.pub._router.sent


def _replay_request_case(rng: random.Random) -> list[bytes]:
    start = rng.choice((b"", b"\x00", (40).to_bytes(8, "big"), (55).to_bytes(8, "big"), (56).to_bytes(8, "big"),
                        b"\xff" * 8, b"\x7f" + b"\xff" * 7, rng.randbytes(8), rng.randbytes(rng.randrange(1, 40))))
    frames = [rng.randbytes(5), b"", start]
    k = rng.randrange(6)
    if k == 0:
        frames = frames[: rng.randrange(3)]
    elif k == 1:
        frames = frames + [rng.randbytes(rng.randrange(9)) for _ in range(rng.randrange(1, 4))]
    elif k == 2:
        frames[1] = rng.randbytes(rng.randrange(1, 9))
    return frames


def targets() -> dict[str, Target]:
    """Every decoder at a socket edge, freshly built (each has its own counters)."""
    from bus.vllm_codec import DecodeError
    from core.engine_types import RequestRejected
    from router.http_front import HttpError
    from worker.http_api import HttpError as WorkerHttpError

    stream, replay = _StreamHarness(), _ReplayHarness()
    return {t.name: t for t in (
        Target("vllm_events", "router SUB ← vLLM / worker PUB", _vllm_run(), (DecodeError,), _vllm_seeds),
        Target("client", "router ROUTER ← client DEALER", _client_run(), (DecodeError,), _client_seeds),
        Target("worker", "router ROUTER ← worker DEALER", _channel(
            "worker_decoder", ("Hello", "Heartbeat", "Goodbye", "TokenChunk", "Completion", "ErrorReply",
                               "ReplyBatch")),
            (DecodeError,), _worker_seeds),
        Target("router", "worker DEALER ← router ROUTER", _channel(
            "router_decoder", ("Welcome", "Refused", "Heartbeat", "Dispatch", "Cancel")),
            (DecodeError,), _router_seeds),
        Target("reply", "client DEALER ← router ROUTER", _channel(
            "reply_decoder", ("Routed", "TokenChunk", "Completion", "ErrorReply")), (DecodeError,), _reply_seeds),
        Target("metrics", "monitor SUB ← router / worker PUB", _channel(
            "metrics_decoder", ("RequestRecord", "WorkerSample")), (DecodeError,), _metrics_seeds),
        # Bad frames here are counted, never raised: no exception is allowed at all.
        Target("kv_stream", "router SUB + replay DEALER ← worker PUB / ROUTER", stream.run, (), _vllm_seeds,
               kind="frames"),
        Target("replay_request", "worker replay ROUTER ← router DEALER", replay.run, (), lambda rng: [],
               kind="request_frames"),
        Target("http_completions", "router HTTP front ← HTTP client", _http_run(), (HttpError,), _http_seeds,
               kind="json"),
        Target("http_worker", "worker HTTP (vLLM API) ← HTTP client", _http_worker_run(),
               (WorkerHttpError, RequestRejected), _http_seeds, kind="json"),
    )}


@dataclass
class Outcome:
    ok: bool  # decoded to a valid value, or raised the documented error
    accepted: bool  # decoded (not refused)
    crash: str = ""  # the unexpected exception, with where it came from


def run_case(target: Target, case: Any) -> Outcome:
    """The property: a valid value or the documented error; anything else is a crash."""
    try:
        target.run(case)
    except target.expected:
        return Outcome(True, False)
    except Exception as exc:  # noqa: BLE001 (the point: anything else is a finding)
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        return Outcome(False, False, f"{type(exc).__name__}: {str(exc)[:160]} at {frame.filename}:{frame.lineno}")
    return Outcome(True, True)


# ----------------------------------------------------------------------------- the suite


@dataclass
class FuzzConfig:
    cases: int = 100_000  # per decoder
    targets: tuple[str, ...] = ()  # empty: every target
    seed: int = 0
    max_crash_examples: int = 3

    @classmethod
    def quick(cls) -> FuzzConfig:
        return cls(cases=2_000)


@dataclass
class _Tally:
    cases: int = 0
    accepted: int = 0
    crashes: int = 0
    slow: int = 0
    max_case_s: float = 0.0
    seconds: float = 0.0
    examples: list = field(default_factory=list)


def run(cfg: FuzzConfig, *, command: str = "kvr bench fuzz", progress=None) -> SuiteResult:
    progress = progress or NullProgress()
    all_targets = targets()
    names = list(cfg.targets or all_targets)
    unknown = [n for n in names if n not in all_targets]
    if unknown:
        raise ValueError(f"unknown fuzz targets {unknown} (known: {', '.join(all_targets)})")
    chunk = max(1, min(1000, cfg.cases))
    progress.start(len(names) * math.ceil(cfg.cases / chunk), "fuzzing")
    rows = []
    logging.disable(logging.WARNING)  # malformed input is logged by design; 100k warnings say nothing
    try:
        for name in names:
            target = all_targets[name]
            rng = random.Random(f"{cfg.seed}:{name}")
            seeds = target.seeds(rng)
            tally = _Tally()
            done = 0
            while done < cfg.cases:
                for _ in range(min(chunk, cfg.cases - done)):
                    case = make_case(rng, target, seeds)
                    t0 = time.perf_counter()
                    outcome = run_case(target, case)
                    dt = time.perf_counter() - t0
                    tally.cases += 1
                    tally.seconds += dt
                    tally.max_case_s = max(tally.max_case_s, dt)
                    tally.slow += dt > SLOW_CASE_S
                    tally.accepted += outcome.accepted
                    if not outcome.ok:
                        tally.crashes += 1
                        if len(tally.examples) < cfg.max_crash_examples:
                            tally.examples.append({"crash": outcome.crash, "input": repr(case)[:300]})
                done += chunk
                progress.step(name)
            rows.append({"decoder": name, "edge": target.edge, "cases": tally.cases, "accepted": tally.accepted,
                         "refused": tally.cases - tally.accepted - tally.crashes, "crashes": tally.crashes,
                         "hangs (>1 s)": tally.slow,
                         "cases_per_s": round(tally.cases / tally.seconds) if tally.seconds else 0,
                         "mean_us": round(tally.seconds / max(1, tally.cases) * 1e6, 1),
                         "max_ms": round(tally.max_case_s * 1e3, 2), "examples": tally.examples})
    finally:
        logging.disable(logging.NOTSET)
        progress.close()
    result = SuiteResult("fuzz", command, asdict(cfg))
    result.tables["fuzz"] = [{k: v for k, v in r.items() if k != "examples"} for r in rows]
    crashes = [{"decoder": r["decoder"], **e} for r in rows for e in r["examples"]]
    if crashes:
        result.tables["crashes"] = crashes
    total = sum(r["cases"] for r in rows)
    result.notes.append(f"{total:,} cases over {len(rows)} decoders, {sum(r['crashes'] for r in rows)} crashes, "
                        f"{sum(r['hangs (>1 s)'] for r in rows)} cases over {SLOW_CASE_S:g} s")
    result.notes.append("cases_per_s, mean_us and max_ms time the decoder only (not making the case)")
    result.notes.append("a crash is any exception but the decoder's documented one (DecodeError; HttpError for the "
                        "HTTP fronts, RequestRejected for the worker's engine; none at all for kv_stream and "
                        "replay_request, which count bad frames)")
    return result
