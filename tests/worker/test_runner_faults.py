"""``kvr worker``'s periodic event-plane faults: publisher restarts and cache resets on a timer."""

from __future__ import annotations

import threading

from tests.waiting import eventually
from worker.runner import WorkerOptions, WorkerRunner


def test_periodic_publisher_restarts_and_cache_resets() -> None:
    runner = WorkerRunner(WorkerOptions(worker_id="f1", router_endpoint="none", restart_publisher_every=0.05,
                                        clear_cache_every=0.05, fault_drop=0.5, seed=2))
    assert runner.backend.publisher.faults.drop_rate == 0.5
    th = threading.Thread(target=runner.run, daemon=True)
    th.start()
    try:
        backend = runner.backend
        eventually(lambda: backend.publisher.counters.restarts >= 2 and backend.engine.pool.stats.resets >= 2,
                   what="both timers fired twice", interval_s=0.02)
    finally:
        runner.stop()
        th.join(timeout=5)
    assert not th.is_alive()


def test_another_block_size_keeps_the_profiles_kv_memory() -> None:
    cfg = WorkerOptions(worker_id="b", router_endpoint="none", block_size=32).backend_config()
    assert cfg.engine_overrides == {"block_size": 32, "num_gpu_blocks": 462}  # 924 x 16 tokens = 462 x 32
    assert WorkerOptions(worker_id="b", block_size=16).backend_config().engine_overrides == {}
    explicit = WorkerOptions(worker_id="b", block_size=32, num_gpu_blocks=100).backend_config()
    assert explicit.engine_overrides == {"num_gpu_blocks": 100, "block_size": 32}
