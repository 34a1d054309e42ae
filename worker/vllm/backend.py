"""An engine backend that forwards the router's requests to a real vLLM server.

The worker service runs either the emulated engine or this backend behind the same
router link (``Hello`` / heartbeats / ``Dispatch`` / ``Cancel``). This backend:

* **registers** with a ``Hello`` built from the server (model, block size, GPU blocks)
  and vLLM's own KV-event endpoints (``engine="vllm"``): the router subscribes to vLLM's
  PUB directly, so the adapter never touches an event (see ``worker/vllm/checks.py`` for
  the endpoint convention, bind/connect and DP port offsets);
* **runs** each ``Dispatch`` as a streamed ``/v1/completions`` on token ids (the router
  already tokenized), ``model`` = the LoRA adapter name when the request names one,
  ``cache_salt`` passed through, ``X-data-parallel-rank`` = the dispatch's rank when
  ``dp_size > 1``; relays every chunk as a ``TokenChunk`` and ends with exactly one
  terminal message: ``Completion`` with the server-reported ``cached_tokens``, or
  ``ErrorReply`` (``CANCELLED`` after a ``Cancel``);
* **reports load** per DP rank from ``/metrics`` (polled in a thread, so a heartbeat
  never waits on HTTP) plus its own count of prompt tokens dispatched but not yet
  past their first token (``queued_prefill_tokens``; vLLM does not export it);
* **reports health**: after ``unhealthy_after`` failed polls in a row :attr:`VllmBackend.healthy`
  turns False and the worker service leaves the router until the server answers again
  (a vLLM restart reloads the model for minutes; requests must not be routed to it meanwhile).

Threading: one thread per in-flight request (bounded by ``max_concurrency``; more
wait in a queue) and one metrics thread. Messages go to ``emit`` (called from those
threads: it must be thread-safe) or, without ``emit``, to an outbox the link drains
with :meth:`VllmBackend.drain`; a link that sleeps in a poller registers a waker with
:meth:`VllmBackend.set_waker` so a message never waits for the next poll timeout.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bus.schema import (
    NO_CAP,
    Completion,
    Dispatch,
    ErrorCode,
    ErrorReply,
    Hello,
    RequestStats,
    TokenChunk,
    WorkerLoad,
)
from core.blocks import DEFAULT_BLOCK_SIZE
from worker.vllm.checks import (
    BlockSizeWatch,
    ServerInfo,
    StartupError,
    check_server,
    host_of_url,
    router_endpoints,
)
from worker.vllm.metrics import EngineStats, engine_stats, parse_prometheus_text
from worker.vllm.openai_client import CompletionRequest, OpenAIClient, VllmHTTPError
from worker.vllm.remote_tokenizer import TokenizerMismatchError, verify_router_tokenizer

logger = logging.getLogger(__name__)

ENGINE_NAME = "vllm"
BackendMessage = TokenChunk | Completion | ErrorReply


@dataclass(frozen=True)
class VllmBackendConfig:
    """Options of ``kvr worker --engine vllm``."""

    worker_id: str
    vllm_url: str
    kv_events_endpoint: str  # exactly as in vLLM's --kv-events-config "endpoint"
    replay_endpoint: str | None = None  # vLLM's "replay_endpoint"
    topic: str = ""  # vLLM's "topic"
    dp_size: int = 1
    block_size: int = DEFAULT_BLOCK_SIZE  # what the router was told; checked against the server
    model: str | None = None  # expected served model; None = take the server's
    num_gpu_blocks: int | None = None  # None = from vllm:cache_config_info
    advertise_host: str | None = None  # host the router dials for vLLM's sockets (default: the URL's host)
    api_key: str | None = None
    ignore_eos: bool = False  # generate exactly max_tokens, as the emulated engine does
    max_concurrency: int = 256
    metrics_interval_s: float = 1.0
    unhealthy_after: int = 3  # consecutive failed /metrics polls before the server counts as down
    startup_timeout_s: float = 600.0
    require_cached_tokens: bool = True
    watch_block_size: bool = True
    tokenizer: str | None = None  # the router's --tokenizer; a tokenizer.json is checked against /tokenize


class _InFlight:
    __slots__ = ("dispatch", "stream", "cancelled", "prefill_tokens", "first_token")

    def __init__(self, dispatch: Dispatch) -> None:
        self.dispatch = dispatch
        self.stream = None
        self.cancelled = False
        self.prefill_tokens = len(dispatch.token_ids)
        self.first_token = False


def _error_code(exc: VllmHTTPError) -> ErrorCode:
    message = str(exc).lower()
    if exc.status == 404 and "model" in message:
        return ErrorCode.UNKNOWN_MODEL
    if exc.status == 400 and ("context length" in message or "too long" in message or "max_model_len" in message):
        return ErrorCode.PROMPT_TOO_LONG
    if exc.status == 400 or exc.status == 422:
        return ErrorCode.BAD_REQUEST
    return ErrorCode.WORKER_ERROR


class VllmBackend:
    """Forward dispatches to one vLLM server (all of its DP ranks). See the module docstring."""

    engine = ENGINE_NAME

    def __init__(
        self,
        *,
        config: VllmBackendConfig,
        client: OpenAIClient | None = None,
        emit: Callable[[BackendMessage], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config.dp_size < 1:
            raise ValueError("dp_size must be >= 1")
        self.config = config
        self.client = client or OpenAIClient(base_url=config.vllm_url, api_key=config.api_key)
        self._outbox: queue.SimpleQueue[BackendMessage] = queue.SimpleQueue()
        self._waker: Callable[[], None] | None = None
        self._emit = emit or self._post
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight: dict[str, _InFlight] = {}
        self._stats: dict[int, EngineStats] = {}
        self._executor = ThreadPoolExecutor(max_workers=config.max_concurrency, thread_name_prefix="kvr-vllm-req")
        self._stop = threading.Event()
        self._metrics_thread: threading.Thread | None = None
        self._watch: BlockSizeWatch | None = None
        self.info: ServerInfo | None = None
        self.metrics_failures = 0
        self._consecutive_failures = 0
        self.events_endpoint, self.replay_endpoint = router_endpoints(
            config.kv_events_endpoint, config.replay_endpoint,
            vllm_host=config.advertise_host or host_of_url(config.vllm_url))

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, probe: bool = True) -> ServerInfo:
        """Check the server (raises ``StartupError``), then start polling its metrics."""
        cfg = self.config
        self.info = check_server(self.client, model=cfg.model, block_size=cfg.block_size,
                                 num_gpu_blocks=cfg.num_gpu_blocks, startup_timeout_s=cfg.startup_timeout_s,
                                 require_cached_tokens=cfg.require_cached_tokens, probe=probe)
        if cfg.tokenizer is not None and cfg.tokenizer.startswith(("http://", "https://")):
            logger.info("the router tokenizes with %s/tokenize: nothing to compare", cfg.tokenizer)
        elif cfg.tokenizer is not None:
            try:
                verify_router_tokenizer(cfg.tokenizer, client=self.client, model=self.info.model)
            except (TokenizerMismatchError, RuntimeError, OSError) as exc:
                raise StartupError(str(exc)) from None
        self.refresh_load()
        self._metrics_thread = threading.Thread(target=self._poll_metrics, name="kvr-vllm-metrics", daemon=True)
        self._metrics_thread.start()
        if cfg.watch_block_size and not self.events_endpoint.startswith("tcp://*"):
            # vLLM binds its PUB: subscribe once more to see the first BlockStored (rank 0).
            self._watch = BlockSizeWatch(endpoint=self.events_endpoint, topic=cfg.topic, block_size=cfg.block_size)
        return self.info

    def close(self, timeout_s: float = 5.0) -> None:
        """Cancel what is in flight (each gets its terminal ``ErrorReply``) and stop the threads."""
        self._stop.set()
        with self._lock:
            ids = list(self._in_flight)
        for request_id in ids:
            self.cancel(request_id)
        self._executor.shutdown(wait=True, cancel_futures=False)
        if self._metrics_thread is not None:
            self._metrics_thread.join(timeout=timeout_s)
        if self._watch is not None:
            self._watch.close()

    def hello(self, *, epoch: int, profile: str = "") -> Hello:
        """The registration message (after :meth:`start`)."""
        if self.info is None:
            raise RuntimeError("start() the backend before registering")
        return Hello(
            worker_id=self.config.worker_id, epoch=epoch, model=self.info.model, block_size=self.info.block_size,
            num_gpu_blocks=self.info.num_gpu_blocks, events_endpoint=self.events_endpoint,
            replay_endpoint=self.replay_endpoint, topic=self.config.topic, dp_size=self.config.dp_size,
            http_url=self.config.vllm_url, profile=profile, engine=ENGINE_NAME,
            max_model_len=self.info.max_model_len or 0)

    # ------------------------------------------------------------------ requests

    def submit(self, dispatch: Dispatch) -> None:
        """Start a request; returns at once. Its messages arrive through ``emit`` / :meth:`drain`."""
        with self._lock:
            if dispatch.request_id in self._in_flight:
                logger.warning("duplicate dispatch %s ignored (already running)", dispatch.request_id)
                return
            self._in_flight[dispatch.request_id] = _InFlight(dispatch)
        if self._stop.is_set():
            self._finish(dispatch.request_id, ErrorReply(dispatch.request_id, ErrorCode.WORKER_ERROR,
                                                        "worker is shutting down", self.config.worker_id))
            return
        self._executor.submit(self._run, dispatch)

    def cancel(self, request_id: str) -> bool:
        """Abort a request (vLLM aborts when its client disconnects). False if unknown."""
        with self._lock:
            entry = self._in_flight.get(request_id)
            if entry is None:
                return False
            entry.cancelled = True
            stream = entry.stream
        if stream is not None:
            stream.close()
        return True

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def set_waker(self, wake: Callable[[], None]) -> None:
        """Called (from request threads) after each message is queued, so a polling loop can wake at once."""
        self._waker = wake

    def _post(self, message: BackendMessage) -> None:
        self._outbox.put(message)
        if self._waker is not None:
            self._waker()

    def drain(self) -> list[BackendMessage]:
        """Messages produced since the last call, in order (only when no ``emit`` was given)."""
        out = []
        while True:
            try:
                out.append(self._outbox.get_nowait())
            except queue.Empty:
                return out

    def _finish(self, request_id: str, message: Completion | ErrorReply) -> None:
        with self._lock:
            self._in_flight.pop(request_id, None)
        self._emit(message)

    def _max_tokens(self, d: Dispatch) -> int | None:
        """``NO_CAP``: what vLLM's chat endpoint does without ``max_tokens`` (the rest of the
        context). Its completions endpoint would default to 16, so the cap is spelled out when the
        server's ``max_model_len`` is known; otherwise none is sent."""
        if d.max_tokens != NO_CAP:
            return d.max_tokens
        if self.info.max_model_len:
            return max(1, self.info.max_model_len - len(d.token_ids))
        return None

    def _request(self, d: Dispatch) -> CompletionRequest:
        model = d.lora_name if d.lora_name is not None else self.info.model
        return CompletionRequest(
            model=model, prompt_token_ids=d.token_ids, cache_salt=d.cache_salt,
            max_tokens=self._max_tokens(d),
            ignore_eos=self.config.ignore_eos,
            data_parallel_rank=d.dp_rank if self.config.dp_size > 1 else None)

    def _run(self, d: Dispatch) -> None:
        wid = self.config.worker_id
        with self._lock:
            entry = self._in_flight.get(d.request_id)
        if entry is None:
            return
        t0 = self._clock()
        first_s = None
        n_out = 0
        finish = None
        try:
            if entry.cancelled:
                raise _Cancelled
            stream = self.client.stream_completion(self._request(d))
            with self._lock:
                entry.stream = stream
                cancelled = entry.cancelled
            if cancelled:
                stream.close()
                raise _Cancelled
            for delta in stream:
                if first_s is None:
                    first_s = self._clock()
                    with self._lock:
                        entry.first_token = True
                n_out += len(delta.token_ids)
                finish = delta.finish_reason or finish
                if delta.token_ids or delta.text:
                    self._emit(TokenChunk(d.request_id, delta.token_ids, delta.text))
            if entry.cancelled:
                raise _Cancelled
            if not stream.done and stream.usage is None:
                raise VllmHTTPError("stream ended before [DONE] (server closed the connection)")
        except _Cancelled:
            self._finish(d.request_id, ErrorReply(d.request_id, ErrorCode.CANCELLED, "cancelled", wid))
            return
        except VllmHTTPError as exc:
            if entry.cancelled:
                self._finish(d.request_id, ErrorReply(d.request_id, ErrorCode.CANCELLED, "cancelled", wid))
            else:
                logger.warning("request %s failed on vLLM: %s", d.request_id, exc)
                self._finish(d.request_id, ErrorReply(d.request_id, _error_code(exc), str(exc), wid))
            return
        except Exception as exc:  # never lose the terminal reply
            logger.exception("request %s: unexpected failure", d.request_id)
            self._finish(d.request_id, ErrorReply(d.request_id, ErrorCode.INTERNAL, repr(exc), wid))
            return
        end = self._clock()
        usage = stream.usage
        if usage is not None and usage.completion_tokens:
            n_out = usage.completion_tokens
        ttft = (first_s if first_s is not None else end) - t0
        self._finish(d.request_id, Completion(
            request_id=d.request_id, worker_id=wid,
            prompt_tokens=usage.prompt_tokens if usage is not None else len(d.token_ids),
            cached_tokens=usage.cached_tokens if usage is not None and usage.cached_tokens is not None else 0,
            output_tokens=n_out, finish_reason=finish or "stop",
            stats=RequestStats(ttft_s=ttft, decode_s=end - t0 - ttft, e2e_s=end - t0),
            dp_rank=d.dp_rank))

    # ------------------------------------------------------------------ load

    def refresh_load(self) -> dict[int, EngineStats]:
        """Read ``/metrics`` now; on failure keep the last known stats (counted, logged)."""
        try:
            stats = engine_stats(parse_prometheus_text(self.client.metrics_text()))
        except VllmHTTPError as exc:
            self.metrics_failures += 1
            self._consecutive_failures += 1
            if self._consecutive_failures == self.config.unhealthy_after:
                logger.error("vLLM at %s is down (%d failed polls: %s): leaving the router until it is back",
                             self.config.vllm_url, self._consecutive_failures, exc)
            elif self._consecutive_failures < self.config.unhealthy_after:
                logger.warning("reading vLLM /metrics failed (%d so far): %s", self.metrics_failures, exc)
            return self._stats
        if self._consecutive_failures >= self.config.unhealthy_after:
            logger.info("vLLM at %s answers again: registering", self.config.vllm_url)
        self._consecutive_failures = 0
        with self._lock:
            self._stats = stats
        return stats

    @property
    def healthy(self) -> bool:
        """False while the server is down (``unhealthy_after`` failed polls in a row).

        The worker service leaves the router (``Goodbye``: requests that streamed nothing are
        routed elsewhere) while this is False, and registers again when it is True.
        """
        return self._consecutive_failures < self.config.unhealthy_after

    def _poll_metrics(self) -> None:
        while not self._stop.wait(self.config.metrics_interval_s):
            self.refresh_load()

    def load(self, dp_rank: int = 0) -> WorkerLoad:
        """Load of one DP rank for the next heartbeat (no I/O)."""
        with self._lock:
            stats = self._stats.get(dp_rank, EngineStats(dp_rank=dp_rank))
            queued = sum(e.prefill_tokens for e in self._in_flight.values()
                         if not e.first_token and e.dispatch.dp_rank == dp_rank)
        blocks = self.info.num_gpu_blocks if self.info is not None else 0
        return stats.to_load(num_gpu_blocks=blocks, queued_prefill_tokens=queued)

    def loads(self) -> dict[int, WorkerLoad]:
        """Load of every DP rank."""
        return {rank: self.load(rank) for rank in range(self.config.dp_size)}


class _Cancelled(Exception):
    pass
