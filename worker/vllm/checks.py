"""Start-up checks of a real vLLM server, and how the router reaches its KV-event sockets.

Everything the router assumes about a worker must hold for the vLLM server behind an
adapter, or predicted and actual prefix hits silently diverge. :func:`check_server`
fails fast, with the fix in the message, when:

* the server does not answer ``/health`` within ``startup_timeout_s`` (a model load);
* it serves another model than the one the router was told (``/v1/models``);
* its block size differs from ``--block-size`` or prefix caching is off
  (``vllm:cache_config_info`` on ``/metrics``; when a server does not expose it, the
  first ``BlockStored`` is checked instead, see :class:`BlockSizeWatch`);
* it does not report ``usage.prompt_tokens_details.cached_tokens`` (a one-token probe;
  vLLM needs ``--enable-prompt-tokens-details``), without which the closed loop is blind.

**Endpoint convention** (what the adapter's ``Hello`` carries): the router applies
vLLM's own rule to the advertised endpoint — it *binds* when the endpoint contains
``*`` or ``::`` (or is ipc/inproc), else it *connects*. :func:`router_endpoints` turns
vLLM's ``--kv-events-config`` endpoint into that form:

* vLLM binds ``tcp://*:5557`` (pod discovery) → advertise ``tcp://<vllm host>:5557``,
  the router connects;
* vLLM connects to ``tcp://router:5557`` (central) → advertise ``tcp://*:5557``, the
  router binds;
* the replay ROUTER always binds → advertise ``tcp://<vllm host>:5558``.

With ``dp_size`` N, rank r uses both ports + r (``bus.sockets.offset_endpoint_for_dp_rank``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import zmq

from bus.sockets import make_sub, vllm_binds
from bus.vllm_codec import DecodeError, VllmEventDecoder
from core.events import MEDIUM_GPU, BlockStored
from worker.vllm.metrics import cache_config, parse_prometheus_text
from worker.vllm.openai_client import CompletionRequest, ModelCard, OpenAIClient, VllmHTTPError

logger = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The vLLM server cannot be routed as configured; the message says what to change."""


@dataclass(frozen=True)
class ServerInfo:
    """What start-up learned about the server."""

    model: str
    lora_adapters: tuple[str, ...]
    block_size: int
    num_gpu_blocks: int
    max_model_len: int | None
    reports_cached_tokens: bool
    returns_token_ids: bool


def _replace_host(endpoint: str, host: str) -> str:
    if not endpoint.startswith("tcp://"):
        return endpoint
    hostport = endpoint[len("tcp://"):]
    port = hostport.rpartition(":")[2]
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"tcp://{host}:{port}"


def router_endpoints(vllm_endpoint: str, vllm_replay_endpoint: str | None, *, vllm_host: str) -> tuple[str, str | None]:
    """(events, replay) endpoints as the router must use them (see the module docstring)."""
    if vllm_binds(vllm_endpoint):
        events = _replace_host(vllm_endpoint, vllm_host)
    else:
        events = _replace_host(vllm_endpoint, "*")  # vLLM dials out: the router listens on that port
    replay = None if vllm_replay_endpoint is None else _replace_host(vllm_replay_endpoint, vllm_host)
    return events, replay


def host_of_url(url: str) -> str:
    host = urlsplit(url).hostname
    if not host:
        raise ValueError(f"no host in {url!r}")
    return host


def wait_healthy(client: OpenAIClient, *, timeout_s: float, interval_s: float = 1.0) -> None:
    """Poll ``/health`` until 2xx; a loading server can take minutes."""
    deadline = time.monotonic() + timeout_s
    while not client.health():
        now = time.monotonic()
        if now >= deadline:
            raise StartupError(f"vLLM at {client.base_url} not healthy after {timeout_s:g} s "
                               f"(is it running, still loading the model, or behind another URL?)")
        time.sleep(min(interval_s, deadline - now))


def _served_model(cards: list[ModelCard], expected: str | None) -> tuple[str, tuple[str, ...]]:
    bases = [c for c in cards if c.parent is None]
    adapters = tuple(c.id for c in cards if c.parent is not None)
    if not bases:
        raise StartupError("vLLM /v1/models lists no base model")
    if expected is None:
        return bases[0].id, adapters
    for card in bases:
        if expected in (card.id, card.root):
            return card.id, adapters
    raise StartupError(
        f"vLLM serves {[c.id for c in bases]} but the router was told model {expected!r}: "
        f"pass --model {bases[0].id!r} (or start vLLM with --served-model-name {expected!r})")


def check_server(
    client: OpenAIClient,
    *,
    model: str | None,
    block_size: int,
    num_gpu_blocks: int | None = None,
    startup_timeout_s: float = 600.0,
    require_cached_tokens: bool = True,
    probe: bool = True,
) -> ServerInfo:
    """Run every start-up check; returns what was learned or raises :class:`StartupError`."""
    wait_healthy(client, timeout_s=startup_timeout_s)
    try:
        cards = client.models()
        served, adapters = _served_model(cards, model)
        cfg = cache_config(parse_prometheus_text(client.metrics_text()))
    except VllmHTTPError as exc:
        raise StartupError(f"vLLM at {client.base_url}: {exc}") from None
    if cfg.block_size is not None and cfg.block_size != block_size:
        raise StartupError(
            f"vLLM block size is {cfg.block_size} (vllm:cache_config_info) but kvr was told {block_size}: "
            f"pass --block-size {cfg.block_size} to the worker and the router, or start vLLM with "
            f"--block-size {block_size}")
    if cfg.block_size is None:
        logger.warning("vLLM does not expose vllm:cache_config_info; block size %d will be checked against "
                       "the first BlockStored event", block_size)
    if cfg.enable_prefix_caching is False:
        raise StartupError("vLLM runs without prefix caching: start it with --enable-prefix-caching")
    blocks = num_gpu_blocks if num_gpu_blocks is not None else cfg.num_gpu_blocks
    if blocks is None:
        raise StartupError("vLLM does not report num_gpu_blocks (vllm:cache_config_info): pass --num-gpu-blocks "
                           "(the 'GPU KV cache size' vLLM logs at start-up, divided by the block size)")
    if num_gpu_blocks is not None and cfg.num_gpu_blocks is not None and num_gpu_blocks != cfg.num_gpu_blocks:
        logger.warning("--num-gpu-blocks %d differs from the server's %d; using %d",
                       num_gpu_blocks, cfg.num_gpu_blocks, num_gpu_blocks)
    reports_cached, returns_ids = True, True
    if probe:
        reports_cached, returns_ids = _probe(client, served)
        if not reports_cached and require_cached_tokens:
            raise StartupError(
                "vLLM does not report usage.prompt_tokens_details.cached_tokens: start it with "
                "--enable-prompt-tokens-details (without it kvr cannot compare predicted and actual hits)")
        if not returns_ids:
            logger.warning("vLLM does not return token_ids in completion chunks (vLLM < 0.10.2?): token "
                           "chunks will carry text only")
    max_len = next((c.max_model_len for c in cards if c.id == served), None)
    info = ServerInfo(model=served, lora_adapters=adapters, block_size=block_size, num_gpu_blocks=blocks,
                      max_model_len=max_len, reports_cached_tokens=reports_cached, returns_token_ids=returns_ids)
    logger.info("vLLM at %s: model %s, block size %d, %d GPU blocks, LoRA %s", client.base_url, served,
                block_size, blocks, list(adapters) or "none")
    return info


def _probe(client: OpenAIClient, model: str) -> tuple[bool, bool]:
    """A one-token prompt, one output token: never a full block, so it caches (and publishes) nothing."""
    try:
        stream = client.stream_completion(CompletionRequest(model=model, prompt_token_ids=[0], max_tokens=1))
        deltas = list(stream)
    except VllmHTTPError as exc:
        raise StartupError(f"probe completion on vLLM at {client.base_url} failed: {exc}") from None
    reports_cached = stream.usage is not None and stream.usage.cached_tokens is not None
    returns_ids = any(d.token_ids for d in deltas)
    return reports_cached, returns_ids


class BlockSizeWatch:
    """Check the first GPU ``BlockStored``'s ``block_size`` against the router's, in a thread.

    Subscribes to vLLM's PUB when vLLM binds it (a PUB serves any number of SUBs); in the
    central topology (vLLM dials the router) there is nothing to subscribe to, and the
    router's index does the check (it ignores and counts events of another block size).
    A mismatch is logged at ERROR and kept in :attr:`mismatch` (``(expected, seen)``).
    """

    def __init__(self, *, endpoint: str, topic: str, block_size: int, timeout_s: float = 3600.0,
                 ctx: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.block_size = block_size
        self.checked = threading.Event()
        self.mismatch: tuple[int, int] | None = None
        self._topic = topic.encode()
        self._timeout_s = timeout_s
        self._ctx = ctx or zmq.Context.instance()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvr-vllm-block-size-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sub, _ = make_sub(self._ctx, self.endpoint, topic=self._topic)
        decoder = VllmEventDecoder()
        deadline = time.monotonic() + self._timeout_s
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                if not sub.poll(100):
                    continue
                frames = sub.recv_multipart()
                if len(frames) != 3:
                    continue
                try:
                    batch = decoder.decode(frames[2])
                except DecodeError:
                    continue
                for ev in batch.events:
                    if isinstance(ev, BlockStored) and ev.block_size > 0 and ev.medium in (None, MEDIUM_GPU):
                        self._verdict(ev.block_size)
                        return
        finally:
            sub.close(linger=0)

    def _verdict(self, seen: int) -> None:
        if seen != self.block_size:
            self.mismatch = (self.block_size, seen)
            logger.error("BLOCK SIZE MISMATCH: vLLM stores blocks of %d tokens but kvr was told %d; every "
                         "prediction will be wrong. Restart the worker and router with --block-size %d.",
                         seen, self.block_size, seen)
        else:
            logger.info("first BlockStored confirms block size %d", seen)
        self.checked.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
