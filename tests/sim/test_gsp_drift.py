"""gsp with drifting popularity: the hot groups change every ``drift_every`` requests."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sim.workloads import make_workload

DRIFT = {"num_groups": 16, "prompts_per_group": 50, "group_distribution": "zipf", "zipf_alpha": 1.5,
         "system_prompt_len": 16, "question_len": 4, "drift_every": 200, "drift_step": 4}


def _groups(params):
    wl = make_workload("gsp", random.Random(3), params)
    return wl, [wl.root_requests(i)[0].group for i in range(wl.num_roots())]


def test_the_hottest_group_moves_by_the_step_at_each_phase():
    wl, groups = _groups(DRIFT)
    assert len(groups) == 800
    hottest = [Counter(groups[k * 200:(k + 1) * 200]).most_common(1)[0][0] for k in range(4)]
    assert hottest == [0, 4, 8, 12]
    assert [wl.group_of_rank(0, i) for i in (0, 199, 200, 799)] == [0, 0, 4, 12]
    assert wl.group_of_rank(15, 200) == 3  # ranks wrap around the groups
    # Requests keep arrival order (request i is the i-th drawn), so the drift is where it says.
    assert [wl.root_requests(i)[0].request_id for i in range(3)] == ["gsp-0", "gsp-1", "gsp-2"]


def test_drift_is_seeded_and_without_it_zipf_is_unchanged():
    _, a = _groups(DRIFT)
    _, b = _groups(DRIFT)
    assert a == b
    _, still = _groups({**DRIFT, "drift_every": 0})
    assert Counter(still[:200]).most_common(1)[0][0] == Counter(still[600:]).most_common(1)[0][0] == 0


def test_drift_needs_zipf_and_a_free_order():
    for bad in ({"group_distribution": "uniform"}, {"ordered": True}, {"drift_every": -1}):
        with pytest.raises(ValueError):
            make_workload("gsp", random.Random(0), {**DRIFT, **bad})
