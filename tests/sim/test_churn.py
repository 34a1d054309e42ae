"""Worker churn in the simulator (sim/churn.py): resets, restarts and scale-out mid-run."""

from __future__ import annotations

import random

import pytest

from core.events import AllBlocksCleared
from sim.churn import RESET, RESTART, ChurnConfig, churn_victim
from sim.cluster import ClusterConfig, SimCluster
from sim.report import comparison_report, run_policies, to_json
from sim.workload import Poisson
from sim.workloads import make_workload

GSP_SMALL = {"num_groups": 6, "prompts_per_group": 8, "system_prompt_len": 512, "question_len": 32, "output_len": 8}


def _config(churn: ChurnConfig, *, workers: int = 3, event_delay_s: float = 0.0) -> ClusterConfig:
    return ClusterConfig(num_workers=workers, profile="h100-8b", engine_overrides={"num_gpu_blocks": 200},
                         event_delay_s=event_delay_s, churn=churn)


class _Recording(SimCluster):
    """Records what the index holds for each worker around churn, and where requests went."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.at_churn: list[tuple[float, str, int, int]] = []  # (time, worker, blocks before, after)
        self.at_clear_applied: list[tuple[float, str, int]] = []
        self.routed: list[tuple[float, str, str]] = []  # (time, request id, worker)
        self.retries: list[tuple[str, str, float]] = []  # (request id, worker, client arrival)
        self.registered_at_route: list[list[str]] = []

    def _on_churn(self, payload) -> None:
        live = [w for w, on in enumerate(self._live) if on]
        w = churn_victim(self._churn_k, live) if live else -1
        before = self.index.num_blocks(self.targets[w]) if self._busy() else -1
        super()._on_churn(payload)
        if before >= 0:
            self.at_churn.append((self.q.now, self.names[w], before, self.index.num_blocks(self.targets[w])))

    def _on_kv_events(self, payload) -> None:
        super()._on_kv_events(payload)
        w, incarnation, events, _ = payload
        if incarnation == self._incarnation[w] and isinstance(events[-1], AllBlocksCleared):
            self.at_clear_applied.append((self.q.now, self.names[w], self.index.num_blocks(self.targets[w])))

    def _dispatch(self, req, now, **kw) -> None:
        self.registered_at_route.append([t.worker_id for t in self.router.targets()])
        super()._dispatch(req, now, **kw)
        fl = self._inflight[req.request_id]
        self.routed.append((now, req.request_id, self.names[fl.worker]))
        if kw.get("retry_of") is not None:
            self.retries.append((req.request_id, self.names[fl.worker], fl.arrival_s))


def _cluster(churn: ChurnConfig, *, policy: str = "kvr", seed: int = 1, rate: float = 20.0, **kw) -> _Recording:
    return _Recording(workload=make_workload("gsp", random.Random(seed), GSP_SMALL),
                      arrivals=Poisson(rate_per_s=rate), policy=policy, config=_config(churn, **kw), seed=seed)


def test_config_is_checked_and_victims_go_round_robin_over_the_fleet_then():
    with pytest.raises(ValueError):
        ChurnConfig(kind="explode")
    with pytest.raises(ValueError):
        ChurnConfig(every_s=-1.0)
    with pytest.raises(ValueError):
        ChurnConfig(join_at_s=(float("inf"),))
    assert not ChurnConfig().churns and ChurnConfig(every_s=2.0).start_s == 2.0
    assert ChurnConfig(every_s=2.0, first_s=0.5).start_s == 0.5
    assert [churn_victim(k, [2, 0, 1]) for k in range(4)] == [0, 1, 2, 0]
    assert churn_victim(3, [0, 1, 2, 3]) == 3  # after a join the next victim may be the joiner


def test_reset_reaches_the_index_through_the_event_plane_after_its_delay():
    c = _cluster(ChurnConfig(every_s=0.5, kind=RESET), event_delay_s=0.25)
    res = c.run()
    assert res.churn_events == len(c.at_churn) >= 2
    assert [name for _, name, _, _ in c.at_churn][:3] == ["w0", "w1", "w2"][: len(c.at_churn)]
    t0, name0, before, after = c.at_churn[0]
    # The engine's cache is gone at once, but the router only knows once the event arrives.
    assert t0 == 0.5 and before > 0 and after == before
    applied = [a for a in c.at_clear_applied if a[1] == name0]
    assert applied[0][0] == pytest.approx(t0 + 0.25) and applied[0][2] == 0
    # A reset loses nothing: preempted requests recompute on the same engine.
    assert (res.failed, res.retried, res.unfinished, res.rejected) == (0, 0, 0, 0)
    assert res.fold.summary()["requests"] == res.requests == 48
    assert res.fold.counters["cache_clears"] == res.churn_events


def test_restart_empties_the_index_at_once_and_retries_requests_not_yet_streamed():
    # A burst (48 requests in ~0.12 s) spread round-robin, so that requests certainly still wait for
    # their prefill on the victim when it restarts (with a cache-aware policy that depends on where
    # it happened to put them: the retry path is the simulator's, not the policy's).
    c = _cluster(ChurnConfig(every_s=0.25, first_s=0.1, kind=RESTART), rate=400.0, policy="round_robin")
    res = c.run()
    assert res.churn_events >= 1
    t0, name0, before, after = c.at_churn[0]
    assert before > 0 and after == 0  # the live router drops a dead incarnation's entries
    # Every request ended exactly once: finished, or failed (it streamed before the restart).
    assert res.fold.summary()["requests"] + res.failed == res.requests == 48
    assert res.unfinished == 0 and res.retried >= 1
    # A retry goes elsewhere than the restarted worker, and keeps the client's first arrival.
    assert len(c.retries) == res.retried
    first = {rid: (t, w) for t, rid, w in reversed(c.routed)}
    for rid, w, arrival_s in c.retries:
        assert w != first[rid][1] and arrival_s == first[rid][0]


def test_restart_of_the_only_worker_fails_what_it_held():
    c = _cluster(ChurnConfig(every_s=100.0, first_s=0.5, kind=RESTART), workers=1, rate=40.0)
    res = c.run()
    assert res.churn_events == 1 and res.retried == 0  # nowhere else to go
    assert res.failed > 0 and res.fold.summary()["requests"] + res.failed == res.requests == 48
    assert res.unfinished == 0


def test_a_joiner_gets_requests_only_after_it_joined():
    c = _cluster(ChurnConfig(join_at_s=(1.0,)), workers=2, policy="round_robin")
    res = c.run()
    assert res.unfinished == 0 and res.churn_events == 0
    times = [t for t, _, _ in c.routed]
    for t, regs in zip(times, c.registered_at_route, strict=True):
        assert ("w2" in regs) == (t >= 1.0)
    on_joiner = [t for t, _, w in c.routed if w == "w2"]
    assert on_joiner and min(on_joiner) >= 1.0
    assert "w2" in res.fold.workers


def test_same_seed_same_report_and_churn_changes_it():
    def report(churn: ChurnConfig) -> str:
        results = run_policies(make_workload=lambda: make_workload("gsp", random.Random(1), GSP_SMALL),
                               make_arrivals=lambda: Poisson(rate_per_s=40.0), policies=["kvr", "round_robin"],
                               config=_config(churn), seed=1)
        return to_json(comparison_report(results))

    restart = ChurnConfig(every_s=0.5, kind=RESTART, join_at_s=(0.7,))
    assert report(restart) == report(restart)
    assert report(ChurnConfig()) != report(restart)
    assert report(ChurnConfig(every_s=0.5)) != report(ChurnConfig())


def test_cli_flags_reach_the_run_and_bad_ones_are_usage_errors():
    import json

    from click.testing import CliRunner

    from cli.main import main

    small = ["sim", "--workload", "gsp", "--gsp-num-groups", "3", "--gsp-prompts-per-group", "8",
             "--gsp-system-prompt-len", "128", "--gsp-question-len", "16", "--gsp-output-len", "64", "--workers", "1",
             "--profile", "h100-8b", "--no-progress", "--policy", "kvr", "--rate", "20", "--json"]
    res = CliRunner().invoke(main, [*small, "--churn-every-s", "100", "--churn-first-s", "0.3",
                                    "--churn-kind", "restart"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["policies"]["kvr"]
    assert row["failed"] > 0 and row["requests"] == 24 - row["failed"]  # a fleet of one: nowhere to retry
    assert "note: kvr: 1 restart(s), 0 join(s); 0 request(s) routed again" in res.stderr
    bad = CliRunner().invoke(main, [*small, "--join-at-s", "-1"])
    assert bad.exit_code == 2
