"""A fake vLLM server for tests without a GPU: HTTP API + KV-event publisher, on 127.0.0.1.

What it serves (shapes as vLLM 0.33's OpenAI server):

* ``POST /v1/completions``: prompt as token ids (or text, tokenized below), streaming
  (SSE, chunked; usage chunk with ``prompt_tokens_details.cached_tokens`` when
  ``report_cached_tokens``; ``data: [DONE]``) or not; ``model`` = served model or a
  LoRA adapter name; ``cache_salt``; ``X-data-parallel-rank`` picks the engine;
* ``GET /v1/models`` (base model + LoRA adapters with ``parent``), ``GET /health``,
  ``POST /tokenize`` (a word-level crc32 tokenizer, BOS = 1 with special tokens), ``POST /detokenize``,
  ``GET /metrics`` (vLLM names, ``engine`` label per DP rank, ``vllm:cache_config_info``).

The engine is one :class:`core.block_pool.BlockPool` per DP rank (vLLM's prefix-cache
semantics: the last prompt token is always computed, lazy LRU eviction) whose events are
published per engine step by a vLLM-compatible publisher (``bus.publisher.EventPublisher``:
``[topic, seq, payload]``, replay ROUTER, DP port offsets). A background thread owns the
publishers, as vLLM's ``zmq-publisher`` thread; :meth:`FakeVllm.publish_payloads` sends
raw payload bytes (the shared fixtures) exactly as they were captured from vLLM.

Every completion body is recorded in :attr:`FakeVllm.requests` (headers in
:attr:`FakeVllm.request_headers`); bodies of streams whose client disconnected are in
:attr:`FakeVllm.aborted`.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import zmq

from bus.publisher import EventPublisher
from bus.vllm_codec import encode_batch
from core.block_pool import BlockPool
from core.events import KVEventBatch

VOCAB_SIZE = 50_000
BOS_TOKEN_ID = 1


_WORDS: dict[int, str] = {}  # id -> word, for /detokenize of ids that /tokenize produced


def fake_tokenize(text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Word-level deterministic tokenizer (ids 2..VOCAB_SIZE-1)."""
    ids = []
    for word in text.split():
        token = 2 + zlib.crc32(word.encode()) % (VOCAB_SIZE - 2)
        _WORDS.setdefault(token, word)
        ids.append(token)
    return ([BOS_TOKEN_ID] + ids) if add_special_tokens else ids


def fake_detokenize(token_ids: list[int]) -> str:
    return " ".join(_WORDS.get(t, f"<{t}>") for t in token_ids if t != BOS_TOKEN_ID)


def fake_output_token(prompt: list[int], i: int) -> int:
    """The i-th generated token (deterministic)."""
    return 2 + (prompt[-1] * 31 + i * 7919) % (VOCAB_SIZE - 2)


@dataclass(frozen=True)
class KvEventsConfig:
    """vLLM's ``--kv-events-config`` fields the fake honours."""

    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    topic: str = ""
    buffer_steps: int = 10_000
    #: Override vLLM's bind-or-connect rule (tests bind 127.0.0.1 only, which vLLM would connect to).
    bind: bool | None = None
    #: Replay replies as vLLM 0.33 (with the topic frame) or as vLLM <= 0.24 ("legacy").
    reply_format: str = "0.33"


class _PublisherThread:
    """Owns one EventPublisher per DP rank; fed through a queue (zmq sockets are single-thread)."""

    def __init__(self, config: KvEventsConfig, dp_size: int) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._ctx = zmq.Context()
        self.publishers: list[EventPublisher] = []
        self._thread = threading.Thread(target=self._run, args=(config, dp_size), name="fake-vllm-publisher",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake vLLM publisher did not start")
        if self._error is not None:
            raise self._error

    def _run(self, config: KvEventsConfig, dp_size: int) -> None:
        try:
            for rank in range(dp_size):
                self.publishers.append(EventPublisher(
                    endpoint=config.endpoint, replay_endpoint=config.replay_endpoint, topic=config.topic,
                    buffer_steps=config.buffer_steps, dp_rank=rank, ctx=self._ctx, bind=config.bind,
                    reply_format=config.reply_format))
        except BaseException as exc:  # reported to the constructor
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set() or not self._queue.empty():
                try:
                    rank, payload, done = self._queue.get(timeout=0.005)
                except queue.Empty:
                    for pub in self.publishers:
                        pub.poll_replay(0)
                    continue
                self.publishers[rank].publish_raw(payload)
                done.set()
                for pub in self.publishers:
                    pub.poll_replay(0)
        finally:
            for pub in self.publishers:
                pub.close()
            self._ctx.term()

    def publish(self, rank: int, payload: bytes) -> threading.Event:
        done = threading.Event()
        self._queue.put((rank, payload, done))
        return done

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client that drops its connection (a cancelled stream) is normal, not a traceback.
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _Engine:
    """One DP rank: a block pool, counters and a lock (HTTP handlers run in threads)."""

    def __init__(self, rank: int, num_gpu_blocks: int, block_size: int) -> None:
        self.rank = rank
        self.pool = BlockPool(num_blocks=num_gpu_blocks, block_size=block_size)
        self.lock = threading.Lock()
        self.running = 0


class FakeVllm:
    """A fake ``vllm serve`` on 127.0.0.1 (ephemeral HTTP port). Use as a context manager."""

    def __init__(
        self,
        *,
        model: str = "fake/model-1b",
        block_size: int = 16,
        num_gpu_blocks: int = 256,
        max_model_len: int = 4096,
        lora_adapters: tuple[str, ...] = (),
        dp_size: int = 1,
        kv_events: KvEventsConfig | None = None,
        report_cached_tokens: bool = True,
        return_token_ids: bool = True,
        expose_cache_config: bool = True,
        token_delay_s: float = 0.0,
        port: int = 0,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.num_gpu_blocks = num_gpu_blocks
        self.max_model_len = max_model_len
        self.lora_adapters = lora_adapters
        self.dp_size = dp_size
        self.report_cached_tokens = report_cached_tokens
        self.return_token_ids = return_token_ids
        self.expose_cache_config = expose_cache_config
        self.token_delay_s = token_delay_s
        self.engines = [_Engine(r, num_gpu_blocks, block_size) for r in range(dp_size)]
        self.requests: list[dict] = []
        self.request_headers: list[dict[str, str]] = []
        self.aborted: list[dict] = []  # bodies of requests whose client disconnected mid-stream
        self.tokenize_calls = 0
        self.fail_next: tuple[int, str] | None = None  # (HTTP status, message) for the next completion
        self._publisher = _PublisherThread(kv_events, dp_size) if kv_events is not None else None
        self._server = _QuietServer(("127.0.0.1", port), _make_handler(self))  # a restart reuses its port
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-vllm-http", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ lifecycle

    @property
    def publishers(self) -> list[EventPublisher]:
        return [] if self._publisher is None else self._publisher.publishers

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        if self._publisher is not None:
            self._publisher.close()

    def __enter__(self) -> FakeVllm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ events

    def publish_payloads(self, payloads: list[bytes], *, dp_rank: int = 0, timeout_s: float = 5.0) -> None:
        """Send raw KV-event payloads (e.g. fixture bytes) as vLLM would; waits until sent."""
        if self._publisher is None:
            raise RuntimeError("this fake was started without kv_events")
        done = [self._publisher.publish(dp_rank, p) for p in payloads]
        for event in done:
            if not event.wait(timeout_s):
                raise TimeoutError("publisher did not send in time")

    def _flush_events(self, engine: _Engine) -> None:
        events = engine.pool.drain_events()  # caller holds engine.lock
        if events and self._publisher is not None:
            payload = encode_batch(KVEventBatch(time.time(), events, engine.rank))
            self._publisher.publish(engine.rank, payload).wait(5)

    # ------------------------------------------------------------------ engine

    def generate(self, body: dict, rank: int):
        """Run one request on ``rank``; yields token ids, then returns ``(prompt_len, cached_tokens)``."""
        prompt = body["prompt"]
        model = body.get("model", self.model)
        lora = model if model in self.lora_adapters else None
        engine = self.engines[rank]
        max_tokens = int(body.get("max_tokens", 16))
        with engine.lock:
            seq = engine.pool.new_sequence(f"fake-{id(body)}", prompt, lora_name=lora,
                                           cache_salt=body.get("cache_salt"))
            hits, cached = engine.pool.get_computed_blocks(seq)
            if engine.pool.allocate_slots(seq, len(prompt) - cached, num_new_computed_tokens=cached,
                                          new_computed_blocks=hits) is None:
                raise MemoryError("KV cache too small for this prompt")
            seq.num_computed_tokens = len(prompt)
            engine.running += 1
            self._flush_events(engine)
        try:
            for i in range(max_tokens):
                if self.token_delay_s:
                    time.sleep(self.token_delay_s)
                token = fake_output_token(prompt, i)
                with engine.lock:
                    engine.pool.append_token_ids(seq, [token])
                    if engine.pool.allocate_slots(seq, 1) is not None:
                        seq.num_computed_tokens += 1
                    self._flush_events(engine)
                yield token
        finally:
            with engine.lock:
                engine.pool.free(seq)
                engine.running -= 1
        return len(prompt), cached

    def metrics_text(self) -> str:
        lines = []
        for name, kind in (("vllm:num_requests_running", "gauge"), ("vllm:num_requests_waiting", "gauge"),
                           ("vllm:kv_cache_usage_perc", "gauge"), ("vllm:prefix_cache_queries_total", "counter"),
                           ("vllm:prefix_cache_hits_total", "counter")):
            lines.append(f"# HELP {name} fake\n# TYPE {name} {kind}")
            for e in self.engines:
                value = {"vllm:num_requests_running": e.running, "vllm:num_requests_waiting": 0,
                         "vllm:kv_cache_usage_perc": e.pool.usage,
                         "vllm:prefix_cache_queries_total": e.pool.stats.queries_tokens,
                         "vllm:prefix_cache_hits_total": e.pool.stats.hits_tokens}[name]
                lines.append(f'{name}{{engine="{e.rank}",model_name="{self.model}"}} {float(value)}')
        if self.expose_cache_config:
            lines.append("# TYPE vllm:cache_config_info gauge")
            lines.append(f'vllm:cache_config_info{{block_size="{self.block_size}",cache_dtype="auto",'
                         f'enable_prefix_caching="True",engine="0",num_gpu_blocks="{self.num_gpu_blocks}"}} 1.0')
        return "\n".join(lines) + "\n"


def _make_handler(fake: FakeVllm):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _json(self, status: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": {"message": message, "type": "BadRequestError", "code": status}})

        def _body(self) -> dict | None:
            try:
                obj = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                return obj if isinstance(obj, dict) else None
            except ValueError:
                return None

        def do_GET(self) -> None:
            if self.path == "/health":
                self._json(200, {})
            elif self.path == "/v1/models":
                data = [{"id": fake.model, "object": "model", "root": fake.model, "parent": None,
                         "max_model_len": fake.max_model_len}]
                data += [{"id": name, "object": "model", "root": f"/adapters/{name}", "parent": fake.model,
                          "max_model_len": fake.max_model_len} for name in fake.lora_adapters]
                self._json(200, {"object": "list", "data": data})
            elif self.path == "/metrics":
                data = fake.metrics_text().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:
            body = self._body()
            if body is None:
                self._error(400, "body must be a JSON object")
            elif self.path == "/tokenize":
                fake.tokenize_calls += 1
                tokens = fake_tokenize(str(body.get("prompt", "")),
                                       add_special_tokens=bool(body.get("add_special_tokens", True)))
                self._json(200, {"count": len(tokens), "max_model_len": fake.max_model_len, "tokens": tokens,
                                 "token_strs": None})
            elif self.path == "/detokenize":
                self._json(200, {"prompt": fake_detokenize(list(body.get("tokens") or []))})
            elif self.path == "/v1/completions":
                self._completion(body)
            else:
                self._error(404, f"no route {self.path}")

        def _completion(self, body: dict) -> None:
            fake.requests.append(body)
            fake.request_headers.append(dict(self.headers))
            if fake.fail_next is not None:
                status, message = fake.fail_next
                fake.fail_next = None
                return self._error(status, message)
            model = body.get("model")
            if model != fake.model and model not in fake.lora_adapters:
                return self._json(404, {"error": {"message": f"The model `{model}` does not exist.",
                                                  "type": "NotFoundError", "code": 404}})
            prompt = body.get("prompt")
            if isinstance(prompt, str):
                body["prompt"] = prompt = fake_tokenize(prompt)
            if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) for t in prompt):
                return self._error(400, "prompt must be a non-empty list of token ids or a string")
            rank = int(self.headers.get("X-data-parallel-rank", 0))
            if not 0 <= rank < fake.dp_size:
                return self._error(400, f"data parallel rank {rank} out of range")
            gen = fake.generate(body, rank)
            if body.get("stream"):
                self._stream(body, gen)
            else:
                self._whole(body, gen)

        def _usage(self, prompt_len: int, cached: int, completion: int) -> dict:
            return {"prompt_tokens": prompt_len, "completion_tokens": completion,
                    "total_tokens": prompt_len + completion,
                    "prompt_tokens_details": {"cached_tokens": cached} if fake.report_cached_tokens else None}

        def _choice(self, token_ids: list[int], finish: str | None) -> dict:
            choice = {"index": 0, "text": "".join(f" t{t}" for t in token_ids), "logprobs": None,
                      "finish_reason": finish, "stop_reason": None}
            if fake.return_token_ids:
                choice["token_ids"] = token_ids
            return choice

        def _whole(self, body: dict, gen) -> None:
            tokens = []
            try:
                while True:
                    tokens.append(next(gen))
            except StopIteration as stop:
                prompt_len, cached = stop.value
            except MemoryError as exc:
                return self._error(500, str(exc))
            self._json(200, {"id": "cmpl-fake", "object": "text_completion", "model": body["model"],
                             "choices": [self._choice(tokens, "length")],
                             "usage": self._usage(prompt_len, cached, len(tokens))})

        def _chunk(self, obj) -> None:
            data = obj if isinstance(obj, bytes) else f"data: {json.dumps(obj)}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _stream(self, body: dict, gen) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            n = 0
            max_tokens = int(body.get("max_tokens", 16))
            head = {"id": "cmpl-fake", "object": "text_completion", "model": body["model"]}
            try:
                try:
                    while True:
                        token = next(gen)
                        n += 1
                        self._chunk({**head, "choices": [self._choice([token], "length" if n == max_tokens
                                                                      else None)], "usage": None})
                except StopIteration as stop:
                    prompt_len, cached = stop.value
                except MemoryError as exc:
                    self._chunk({"error": {"message": str(exc), "type": "InternalServerError", "code": 500}})
                    self.wfile.write(b"0\r\n\r\n")
                    return
                if (body.get("stream_options") or {}).get("include_usage"):
                    self._chunk({**head, "choices": [], "usage": self._usage(prompt_len, cached, n)})
                self._chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
            except OSError:  # the client went away: vLLM aborts the request
                gen.close()
                fake.aborted.append(body)

    return Handler
