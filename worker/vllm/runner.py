"""Assemble ``kvr worker --engine vllm``: the vLLM backend on the worker service's router link.

The same :class:`worker.service.WorkerService` that runs the emulated engine runs
:class:`worker.vllm.backend.VllmBackend`; only the backend differs. Start-up checks run in
the constructor, so a misconfigured server fails before anything registers with the router.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from bus import names
from core.blocks import DEFAULT_BLOCK_SIZE
from worker.service import WorkerService, router_endpoints
from worker.vllm.backend import VllmBackend, VllmBackendConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VllmWorkerOptions:
    """Everything ``kvr worker --engine vllm`` takes."""

    worker_id: str
    vllm_url: str
    kv_events_endpoint: str
    router_endpoint: str | None = f"tcp://127.0.0.1:{names.ROUTER_WORKERS_PORT}"  # the router's worker port
    replay_endpoint: str | None = None
    topic: str = ""
    dp_size: int = 1
    block_size: int = DEFAULT_BLOCK_SIZE
    model: str | None = None
    num_gpu_blocks: int | None = None
    advertise_host: str | None = None
    tokenizer: str | None = None
    api_key: str | None = None
    ignore_eos: bool = False
    startup_timeout_s: float = 600.0
    heartbeat_interval_s: float = 1.0
    profile: str = ""
    metrics_interval_s: float = 1.0
    unhealthy_after: int = 3

    def backend_config(self) -> VllmBackendConfig:
        return VllmBackendConfig(
            worker_id=self.worker_id, vllm_url=self.vllm_url, kv_events_endpoint=self.kv_events_endpoint,
            replay_endpoint=self.replay_endpoint, topic=self.topic, dp_size=self.dp_size,
            block_size=self.block_size, model=self.model, num_gpu_blocks=self.num_gpu_blocks,
            advertise_host=self.advertise_host, api_key=self.api_key, ignore_eos=self.ignore_eos,
            startup_timeout_s=self.startup_timeout_s, tokenizer=self.tokenizer,
            metrics_interval_s=self.metrics_interval_s, unhealthy_after=self.unhealthy_after)


class VllmWorkerRunner:
    """Checks the server, then :meth:`run` serves the router link until :meth:`stop`."""

    def __init__(self, options: VllmWorkerOptions, *, probe: bool = True) -> None:
        self.options = options
        self.backend = VllmBackend(config=options.backend_config())
        info = self.backend.start(probe=probe)  # raises StartupError with the fix in its message
        router = router_endpoints(options.router_endpoint)
        self.service = WorkerService(backend=self.backend, router_endpoint=router, worker_id=options.worker_id,
                                     profile=options.profile, heartbeat_interval_s=options.heartbeat_interval_s)
        logger.info("worker %s: vLLM %s (%s, %d blocks x %d tokens, dp %d), router %s subscribes to %s "
                    "(replay %s, topic %r)", options.worker_id, options.vllm_url, info.model, info.num_gpu_blocks,
                    info.block_size, options.dp_size, router, self.backend.events_endpoint,
                    self.backend.replay_endpoint, options.topic)

    def run(self) -> None:
        self.service.run()  # closes the backend on the way out

    def stop(self) -> None:
        self.service.stop()
