"""``kvr bench light-load``: the figures of a drive, and one quick live run."""

from __future__ import annotations

import math
import random
import shutil
from types import SimpleNamespace

import pytest

from bench.light_load import INSTRUCTION, LightLoadConfig, drive, run, summarise


def _result(worker: str, cached: int | None, ttft_s: float | None, *, error: bool = False):
    completion = None if cached is None else SimpleNamespace(cached_tokens=cached)
    return SimpleNamespace(routed=SimpleNamespace(worker_id=worker), completion=completion,
                           error="e" if error else None, ttft_s=ttft_s)


def test_summarise_counts_workers_and_splits_hits_from_misses() -> None:
    results = [_result("w0", 16, 0.020), _result("w0", 32, 0.030), _result("w1", 0, 0.050),
               _result("w0", None, None, error=True)]
    row = summarise(results, workers=4)
    assert row["per_worker"] == {"w0": 3, "w1": 1}
    assert row["largest_share"] == 0.75 and row["fair_share"] == 0.25
    assert (row["hits"], row["misses"], row["errors"], row["requests"]) == (2, 1, 1, 4)
    assert row["hit_ttft_mean_ms"] == pytest.approx(25.0) and row["miss_ttft_mean_ms"] == pytest.approx(50.0)
    assert row["ttft_mean_ms"] == pytest.approx(100 / 3)
    assert math.isnan(summarise([_result("w0", 16, 0.02)], workers=2)["miss_ttft_mean_ms"])


def test_drive_sends_every_prompt_with_the_instruction_and_returns_results_in_send_order() -> None:
    class Client:
        def __init__(self) -> None:
            self.sent: list = []
            self.answered = 0

        def send(self, request) -> None:
            self.sent.append(request)

        def poll(self, timeout_ms: int) -> list:
            out = [SimpleNamespace(request_id=r.request_id, done=True)
                   for r in reversed(self.sent[self.answered:])]  # answered out of order
            self.answered = len(self.sent)
            return out

    client = Client()
    results = drive(client, rate_per_s=2000.0, requests=5, max_tokens=3, rng=random.Random(0), id_prefix="p-",
                    desk=7)
    assert [r.request_id for r in results] == [f"p-{i}" for i in range(5)]
    assert all(r.prompt.startswith(f"Desk 7. {INSTRUCTION} ") and r.max_tokens == 3 for r in client.sent)


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_quick_run_answers_every_request_and_reports_kvr_goals() -> None:
    cfg = LightLoadConfig.quick()
    result = run(cfg)
    (row,) = result.tables["light load"]
    assert row["policy"] == "kvr" and row["requests"] == cfg.requests and row["errors"] == 0
    assert sum(row["per_worker"].values()) == cfg.requests
    assert {g.name.split(" at ")[0] for g in result.goals} >= {"largest worker share / fair share"}
