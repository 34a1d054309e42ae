"""Assemble a worker process: emulated backend + router link + optional HTTP face + fault timers."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from bus import names
from bus.publisher import FaultPlan
from worker.emulated import EmulatedBackend, EmulatedWorkerConfig
from worker.service import WorkerService, router_endpoints

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerOptions:
    """Everything ``kvr worker`` takes (one field per CLI option)."""

    worker_id: str
    router_endpoint: str | None = f"tcp://127.0.0.1:{names.ROUTER_WORKERS_PORT}"
    events_endpoint: str = "tcp://127.0.0.1:0"
    events_dial: bool = False
    replay_endpoint: str | None = "tcp://127.0.0.1:0"
    topic: str = ""  # vLLM's default (worker/emulated.py)
    advertise_host: str = "127.0.0.1"
    profile: str = "simple"
    model: str = "kvr-emulated"
    speedup: float = 1.0
    seed: int | None = None
    tokenizer: str | None = None
    dp_size: int = 1  # data-parallel ranks (fixed --events-endpoint / --replay-endpoint ports when > 1)
    block_size: int | None = None  # None: the profile's; another size keeps the profile's KV bytes
    num_gpu_blocks: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None  # None: the profile's (vLLM's --max-model-len)
    no_prefix_caching: bool = False
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    heartbeat_interval: float = 1.0
    fault_drop: float = 0.0
    fault_duplicate: float = 0.0
    fault_reorder: float = 0.0
    fault_delay: float = 0.0
    fault_delay_ms: float = 50.0
    events_hwm: int = 100_000  # KV-event PUB high-water mark (vLLM's KVEventsConfig.hwm)
    events_sndbuf: int = 0  # KV-event PUB kernel send buffer, bytes (0: the OS's)
    lora_modules: str | None = None  # comma-separated adapter names
    stream_interval: int = 1
    hash_algo: str | None = None  # None: vLLM's default sha256 (core/external_block_hash.py)
    restart_publisher_every: float = 0.0
    clear_cache_every: float = 0.0
    curve_dir: str | None = None  # CURVE keys (bus/security.py): router link and event sockets authenticated
    curve_key: str = "worker"  # this worker's key pair in curve_dir

    def backend_config(self) -> EmulatedWorkerConfig:
        rates = (self.fault_drop, self.fault_duplicate, self.fault_reorder, self.fault_delay)
        faults = None
        if any(rates):
            faults = FaultPlan(drop_rate=self.fault_drop, duplicate_rate=self.fault_duplicate,
                               reorder_rate=self.fault_reorder, delay_rate=self.fault_delay,
                               delay_ms=self.fault_delay_ms)
        overrides = {}
        for name in ("num_gpu_blocks", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) is not None:
                overrides[name] = getattr(self, name)
        if self.block_size is not None:
            from core.profiles import get_profile

            prof = get_profile(self.profile)
            if self.block_size != prof.block_size:
                overrides["block_size"] = self.block_size
                # Same KV memory in bigger or smaller blocks (vLLM sizes the pool from memory).
                overrides.setdefault("num_gpu_blocks", prof.num_gpu_blocks * prof.block_size // self.block_size)
        if self.hash_algo is not None:
            overrides["hash_algo"] = self.hash_algo
        if self.no_prefix_caching:
            overrides["enable_prefix_caching"] = False
        replay = None if self.replay_endpoint in (None, "", "none") else self.replay_endpoint
        return EmulatedWorkerConfig(
            worker_id=self.worker_id, model=self.model, profile=self.profile, speedup=self.speedup,
            events_endpoint=self.events_endpoint, events_bind=not self.events_dial, replay_endpoint=replay,
            topic=self.topic, advertise_host=self.advertise_host, seed=self.seed, tokenizer=self.tokenizer,
            faults=faults, engine_overrides=overrides, events_hwm=self.events_hwm,
            events_sndbuf=self.events_sndbuf,
            stream_interval=self.stream_interval,
            lora_modules=tuple(n.strip() for n in (self.lora_modules or "").split(",") if n.strip()),
        )


class WorkerRunner:
    """Builds the worker from options; :meth:`run` blocks until :meth:`stop`."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        router = router_endpoints(options.router_endpoint)
        curve = None
        if options.curve_dir:
            from bus.security import load_curve

            curve = load_curve(options.curve_dir, name=options.curve_key)
        if options.dp_size > 1:
            from worker.emulated_dp import EmulatedDPBackend

            self.backend = EmulatedDPBackend(config=options.backend_config(), dp_size=options.dp_size, curve=curve)
        else:
            self.backend = EmulatedBackend(config=options.backend_config(), curve=curve)
        engine = self.backend.engine
        if options.max_model_len is not None and engine.max_model_len < options.max_model_len:
            # vLLM refuses to start on this too, rather than serve a shorter length than asked.
            self.backend.close()
            raise ValueError(f"--max-model-len {options.max_model_len} is more than the KV cache holds "
                             f"({engine.max_model_len} tokens): lower it, or raise --num-gpu-blocks")
        self.service = WorkerService(
            backend=self.backend, router_endpoint=router, worker_id=options.worker_id, profile=options.profile,
            heartbeat_interval_s=options.heartbeat_interval, curve=curve,
        )
        self.http = None
        if options.http_port is not None:
            from worker.http_api import HttpFront

            self.http = HttpFront(service=self.service, backend=self.backend, host=options.http_host,
                                  port=options.http_port)
            self.backend.http_url = self.http.url  # the router records it (kvr inspect, benchmarks)
        self._timers: list[threading.Thread] = []
        self._stopped = threading.Event()

    @property
    def http_url(self) -> str | None:
        return None if self.http is None else self.http.url

    def bound_endpoints(self) -> dict[str, str | None]:
        """Every socket this worker listens on, ports resolved (``None``: not bound): the KV-event
        PUB and replay ROUTER of each data-parallel rank (``events``, ``replay``; rank r > 0 as
        ``events.r``, ``replay.r``) and the HTTP API."""
        ranks = getattr(self.backend, "ranks", [self.backend])
        out: dict[str, str | None] = {}
        for rank, backend in enumerate(ranks):
            suffix = f".{rank}" if rank else ""
            pub = backend.publisher
            out[f"events{suffix}"] = None if self.options.events_dial else pub.endpoint
            out[f"replay{suffix}"] = pub.replay_endpoint
        out["http"] = self.http_url
        return out

    def _every(self, period_s: float, action, name: str) -> None:
        def loop() -> None:
            while not self._stopped.wait(period_s):
                self.service.call(action)

        t = threading.Thread(target=loop, name=name, daemon=True)
        t.start()
        self._timers.append(t)

    def run(self) -> None:
        opts = self.options
        if self.http is not None:
            self.http.start()
            logger.info("HTTP API on %s", self.http.url)
        if opts.restart_publisher_every > 0:
            self._every(opts.restart_publisher_every, self.backend.restart_publisher, "kvr-fault-restart")
        if opts.clear_cache_every > 0:
            # The fault always clears: running requests are preempted (vLLM's reset_running_requests).
            self._every(opts.clear_cache_every, lambda: self.backend.reset_prefix_cache(True), "kvr-fault-clear")
        logger.info("worker %s: profile %s, %d blocks x %d tokens, speedup %.1f, events %s, replay %s",
                    opts.worker_id, opts.profile, self.backend.engine.config.num_gpu_blocks,
                    self.backend.engine.config.block_size, opts.speedup, self.backend.events_endpoint,
                    self.backend.replay_endpoint)
        try:
            self.service.run()
        finally:
            self._stopped.set()
            if self.http is not None:
                self.http.close()

    def stop(self) -> None:
        self._stopped.set()
        self.service.stop()
