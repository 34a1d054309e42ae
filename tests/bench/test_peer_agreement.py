"""``kvr bench peer-agreement``: the agreement figures, the load the model is fed, and (where
sglang-router is installed) one live drive."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from bench.peer import PeerConfig, text_workload
from bench.peer_agreement import (
    Sent,
    agreement,
    character_match_rates,
    compare,
    disagreement_kind,
    in_flight_at,
    run,
)

W = ["a", "b", "c"]


def test_agreement_counts_same_worker_confusion_and_first_disagreement() -> None:
    live = ["a", "a", "b", "c", "c"]
    model = ["a", "b", "b", "c", "a"]
    got = agreement(live, model, W)
    assert (got["requests"], got["agree"], got["agreement"], got["first_disagreement"]) == (5, 3, 0.6, 1)
    assert got["confusion"] == {"a": {"a": 1, "b": 1}, "b": {"b": 1}, "c": {"a": 1, "c": 1}}
    assert got["agreement_relabelled"] == 0.6  # no relabelling does better here


def test_relabelled_agreement_finds_the_same_grouping_under_other_names() -> None:
    live = ["a", "a", "b", "b", "c"]
    model = ["b", "b", "c", "c", "a"]  # the same three groups, every worker renamed
    got = agreement(live, model, W)
    assert got["agreement"] == 0.0 and got["agreement_relabelled"] == 1.0
    assert agreement(live, live, W)["first_disagreement"] is None
    with pytest.raises(ValueError):
        agreement(live, model[:-1], W)


def test_in_flight_counts_requests_sent_before_and_answered_after() -> None:
    sent = [Sent(0.0, 5.0, "a"), Sent(1.0, 2.0, "b"), Sent(3.0, 4.0, None), Sent(3.5, 6.0, "a"),
            Sent(5.0, 7.0, "c")]
    assert in_flight_at(sent, W) == [
        {"a": 0, "b": 0, "c": 0},
        {"a": 1, "b": 0, "c": 0},
        {"a": 1, "b": 0, "c": 0},  # b answered at 2.0; the failed request counts nowhere
        {"a": 1, "b": 0, "c": 0},
        {"a": 1, "b": 0, "c": 0},  # answered at exactly 5.0: no longer in flight
    ]


def test_character_match_rate_is_the_longest_prefix_shared_with_an_earlier_prompt() -> None:
    assert character_match_rates(["abcdef", "abcxyz", "abcdxx", "zz", ""]) == [0.0, 0.5, 4 / 6, 0.0, 0.0]


@pytest.mark.parametrize(("reason", "loads", "above", "kind"), [
    ("tree match rate 0.94 > 0.3 (900 tokens)", (0, 0), (True, True), "tree"),
    ("tree match rate 0.31 > 0.3 (31 tokens)", (0, 1), (True, False), "threshold"),
    ("tree match rate 0.29 <= 0.3: least loaded", (0, 0), (False, True), "threshold"),
    ("tree match rate 0.00 <= 0.3: least loaded", (2, 2), (False, False), "tie"),
    ("tree match rate 0.00 <= 0.3: least loaded", (3, 2), (False, False), "load"),
    ("imbalanced (max 70, min 0 in flight): least loaded", (3, 2), (True, False), "load"),
])
def test_disagreement_kinds(reason, loads, above, kind) -> None:
    assert disagreement_kind(reason, *loads, token_rate_above=above[0], char_rate_above=above[1]) == kind


def test_compare_replays_the_model_with_the_live_loads_and_order() -> None:
    cfg = PeerConfig(groups=3, prompts_per_group=3, system_words=40, question_words=5)
    prompts = [p for _, p in text_workload(cfg, 3)]
    group = {p: p.split("]")[0] for p in prompts}
    # A live run one request at a time: the first of the router's order takes every group (the
    # loads are all 0, and a group's later prompts follow its first in the tree).
    sequential = [(p, Sent(float(i), i + 0.5, "b")) for i, p in enumerate(prompts)]
    summary, disagree = compare(sequential, ["b", "a", "c"])
    assert (summary["agreement"], summary["peak_in_flight"], disagree) == (1.0, 0, [])
    assert summary["model_per_worker"] == {"b": 9, "a": 0, "c": 0}
    # The same run read with the wrong tie order: every request disagrees; each group's first
    # prompt on the tie (every load 0), the others because the model's tree follows it.
    summary, disagree = compare(sequential, ["a", "b", "c"])
    assert (summary["agreement"], summary["agreement_relabelled"]) == (0.0, 1.0)
    assert summary["kinds"] == {"tie": 3, "tree": 6}
    # Overlapping requests: each new group goes where the fewest are in flight, first in order on
    # ties; live placed groups so, and the model agrees on every one.
    first_seen: dict[str, str] = {}
    live = []
    for i, p in enumerate(prompts):
        busy = {s.worker for _, s in live if s.done_s > i}
        worker = first_seen.setdefault(group[p], next(w for w in W if w not in busy))
        live.append((p, Sent(float(i), i + 1.5, worker)))  # each in flight over the next request
    summary, disagree = compare(live, W)
    assert summary["agreement"] == 1.0 and summary["peak_in_flight"] == 1
    assert len(set(first_seen.values())) > 1  # the groups did spread: the loads were read


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("sglang_router") is None, reason="needs sglang-router (PyPI)")
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_live_sglang_router_one_request_at_a_time_agrees_with_its_model(tmp_path) -> None:
    cfg = PeerConfig.quick()
    cfg.repeats, cfg.out_dir = 1, str(tmp_path)
    result = run(cfg, sequential=True)
    (row,) = result.tables["seeds"]
    assert (row["requests"], row["errors"], row["peak_in_flight"]) == (8, 0, 0)
    assert sorted(row["router_order"].split()) == sorted(row["listed_order"].split()) == ["worker-0", "worker-1"]
    assert row["agreement"] == 1.0 and result.tables["disagreements"] == []
