"""Every fault a kvr cluster meets, injected into real processes under a steady load (bench/faults.py).

For every case: each request sent ended in exactly one terminal reply (a result or an explicit
error, of the codes the fault explains), nothing crashed but what was killed on purpose, and the
router's index equals the workers' cached blocks exactly within ``exact_within_s`` of the fault's
end (and after the load drains). Timings are measured, not slept: see bench/faults.py.

``redis_down`` lasts 3 s rather than 10 s: the suite runs in CI on two cores, and what matters is
that it outlasts every timeout involved (the 0.5 s Redis socket timeout, the 0.25 s mirror check, the
1.5 s heartbeat timeout), which 3 s does; ``kvr bench faults --redis-down 10`` runs the long one.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from bench.faults import ALLOWED_ERRORS, CASES, EXACT_WITHIN_S, FaultsConfig, run_case

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]

CFG = FaultsConfig()


@pytest.mark.timeout(100)
@pytest.mark.parametrize("case", CASES)
def test_fault(case: str, fault_rows: list) -> None:
    r, logs = _run_and_check(case, fault_rows)
    # The index equals the workers' truth within 1 s of the fault's end (to the sampling step).
    # The one timing check here: on two shared cores, a burst of other work can hold the router's
    # catch-up past it once in a while (seen: 1.34 s in one CI run of slow_subscriber, 0.03-0.42 s
    # in the runs around it). Such a case runs once more, from a fresh cluster, with every check
    # above strict again; only the timing gets this second chance, and both runs are reported.
    if not _on_time(r):
        first = r.index_exact_s
        r, logs = _run_and_check(case, fault_rows)
        assert _on_time(r), f"index == truth {first} s, then {r.index_exact_s} s after the fault {logs}"


def _on_time(r) -> bool:
    within_s = EXACT_WITHIN_S.get(r.case, CFG.exact_within_s)
    return r.index_exact_s is not None and r.index_exact_s <= within_s + CFG.sample_s


def _run_and_check(case: str, fault_rows: list):
    run_dir = Path(tempfile.mkdtemp(prefix="kvr-faults-")) / f"faults-{case.replace('_', '-')}"
    r = run_case(CFG, case, run_dir)
    fault_rows.append(r)
    logs = f"(logs in {run_dir / 'logs'})"
    # Nothing lost: every request sent ended in exactly one terminal reply.
    assert r.sent > 20, logs
    assert r.lost == 0, logs
    assert r.completed + r.errored == r.sent
    assert r.unmatched_replies == 0, f"a second terminal reply, or one nobody asked for {logs}"
    assert set(r.error_codes) <= ALLOWED_ERRORS.get(case, set()), f"{r.error_codes} {logs}"
    # No process crashed (the one killed on purpose is not a crash).
    assert r.crashed == [], logs
    assert r.exact_after_drain, logs
    _case_specific(case, r, logs)
    return r, logs


def _case_specific(case: str, r, logs: str) -> None:
    n = r.notes
    if case == "worker_kill":
        # The long request streaming on the victim ends with WORKER_DIED; none is left hanging.
        assert n["victim_streaming"] >= 1 and n["long_requests"].get("worker_died", 0) >= n["victim_streaming"], n
        assert n["long_requests_unanswered"] == 0, n
    elif case == "router_replica_kill":
        # The survivor kept every worker and served on; requests the dead replica had not answered
        # failed over (a streamed one may end router_restarted, explicitly: ALLOWED_ERRORS).
        assert n["survivor_workers"] == 2, logs
        assert r.connection_losses >= 1, logs
    elif case == "router_restart":
        assert r.connection_losses == 1, logs  # the client saw its router go, and said so
    elif case in ("redis_restart", "redis_down"):
        assert n["router_counters"].get("mirror_resyncs", 0) >= 1, n  # the mirror was rewritten
    elif case == "redis_oom":
        # Routing went on (checked above: nothing lost, no error); /health said why Redis held a
        # stale mirror, and says ok again once the rewrite was read back.
        assert n["health_during"].startswith("degraded (out_of_memory since "), n
        assert n["health_after"] == "ok" and n["health_ok_after_s"] is not None, n
        assert n["router_counters"].get("mirror_resyncs", 0) >= 1, n
    elif case == "drop":
        # The drops did happen (the router replayed them), and none was lost for good.
        assert n["stream_replays"] >= 1 and n["stream_gaps"] == 0, n
    elif case == "client_disconnect":
        assert n["disconnected_streaming"] >= 1 and n["router_pending_drained"], n
    elif case == "worker_stall":
        assert n["declared_dead"], n
    elif case == "rogue_publisher":
        # Every message of the unregistered peer was counted and ignored (the index stayed exact).
        assert n["unknown_peer_messages"] == n["rogue_messages"], n
    elif case == "router_stall":
        # Every long request ended with all its tokens or an explicit error; none is short, none hangs.
        long = n["long_requests"]
        assert n["streaming_at_stall"] >= 1 and not {"missing_tokens", "extra_tokens", "unanswered"} & set(long), n
        assert sum(long.values()) == CFG.stall_requests and n["worker_links_replaced"] >= CFG.workers, n
    elif case in ("impostor_hello", "impostor_hello_curve"):
        # Refused every time (by the link token, or by the CURVE key binding): never welcomed, never
        # dispatched to; worker-0 kept its registration.
        assert n["impostor_dispatches"] == 0 and n["impostor_welcomed"] == 0 and n["workers"] == CFG.workers, n
        counter = "rejected_hello_key_mismatch" if case == "impostor_hello_curve" else "rejected_hello_duplicate_id"
        assert n[counter] >= 1 and n["impostor_received"].get(f"Refused:{counter.removeprefix('rejected_hello_')}"), n
    elif case == "duplicate_worker":
        # The second `kvr worker --id worker-0` exits non-zero with one line; the live one never flapped.
        assert n["duplicate_exit_code"] != 0 and n["duplicate_last_line"].startswith("router refused this worker:"), n
        assert n["rejected_hello_duplicate_id"] >= 1 and n["worker_links_replaced"] == 0, n
        assert n["workers"] == CFG.workers, n
    elif case == "lying_worker":
        # The liar (claims every prompt of the load, caches nothing) is distrusted from the closed loop
        # alone, within seconds, and the honest workers are not; distrusted, it draws at most its fair
        # share. Nothing short: every answer carried as many tokens as its completion says.
        assert n["trust_downgrades"] == 1 and n["trust_recoveries"] == 0, n
        assert n["downgraded_after_s"] is not None and n["downgraded_after_s"] <= CFG.lie_detect_s, n
        assert n["trust_after_downgrade"] == {"liar": 0.0, "worker-0": 1.0, "worker-1": 1.0}, n
        assert n["requests_distrusted"] > 10 and n["liar_share_distrusted"] <= n["fair_share"], n
        assert n["router_counters"].get("incomplete_completions", 0) == 0, n
    elif case == "worker_stall_http":
        # Every streamed HTTP response is one well-formed response: complete, or ended with an SSE
        # error event (never a second status line inside the body, never cut short).
        outcomes = n["http_responses"]
        assert n["streaming_on_victim_at_stop"] >= 1 and sum(outcomes.values()) == 2 * CFG.http_requests, n
        assert set(outcomes) <= {"complete", "error:worker_died"}, n
        assert n["incomplete_completions"] == 0 and n["router_log_tracebacks"] == 0, n
    elif case == "client_disconnect_http":
        # Every abandoned request (8 non-streamed, 4 streamed) is cancelled at the router (the front
        # saw its client leave) and leaves the engines (~2 s of decoding left); the pending table
        # drains; the front's failed writes to the streamed ones' clients log no traceback.
        abandoned = CFG.http_requests + CFG.http_requests // 2  # non-streamed, and streamed alongside
        assert n["engines_busy_before_leaving"] >= abandoned, n
        assert n["cancelled_at_router"] == n["abandoned_requests"] == abandoned, n
        assert n["abandoned_with_a_reply"] == 0, n
        assert n["first_abandoned_stopped_s"] is not None and n["engines_ran_after_clients_left_s"] is not None, n
        assert n["router_pending_drained"] and n["router_log_tracebacks"] == 0, n
    elif case == "slow_subscriber":
        # It was connected, and its queue at the publisher overflowed: most of the burst never
        # reached it (the router's subscription on the same PUB lost nothing, see above).
        assert n["slow_subscriber_received"] >= 1, n
        assert n["slow_subscriber_dropped"] >= n["published_meanwhile"] // 2 > 0, n


def test_kvr_bench_faults_lists_the_same_cases_as_the_suite() -> None:
    from cli._bench_suites import faults

    (opt,) = [p for p in faults.params if p.name == "cases"]
    assert tuple(opt.type.choices) == CASES
