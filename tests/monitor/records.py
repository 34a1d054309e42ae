"""Metrics records for monitor tests."""

from __future__ import annotations

from bus.schema import ErrorCode, RequestRecord, WorkerLoad, WorkerSample


def request(
    rid: str, *, worker: str | None = "w0", t: float = 100.0, prompt: int = 64, cached: int = 0,
    predicted: int | None = None, ttft: float = 0.1, e2e: float = 0.5, output: int = 5, error: ErrorCode | None = None,
) -> RequestRecord:
    return RequestRecord(
        request_id=rid, worker_id=worker, arrival_s=t, prompt_tokens=prompt, cached_tokens=cached,
        predicted_cached_tokens=predicted, output_tokens=output, ttft_s=ttft, e2e_s=e2e, policy="kvr",
        error=None if error is None else error.value, queue_s=0.01,
    )


def sample(
    worker: str = "w0", *, t: float = 100.0, kv: float = 0.5, running: int = 1, waiting: int = 0,
    indexed: int = 10, confidence: str = "fresh", gaps: int = 0, replays: int = 0, resets: int = 0,
    evictions: int = 0, lag: float = 0.002, applied: int = 1, trust: float = 1.0, router: str = "",
) -> WorkerSample:
    return WorkerSample(
        worker_id=worker, t_s=t,
        load=WorkerLoad(running=running, waiting=waiting, queued_prefill_tokens=32, kv_usage=kv,
                        num_free_blocks=50, num_gpu_blocks=100),
        indexed_blocks=indexed, confidence=confidence, events_applied=applied, event_lag_s=lag,
        gaps=gaps, replays=replays, resets=resets, evictions=evictions, trust=trust, router_id=router,
    )
