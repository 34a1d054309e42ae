"""The router's per-target metrics samples (router/stats.py) carry what the monitor draws and exports."""

from __future__ import annotations

from bus.codec import encode, metrics_decoder
from core.policies import get_policy
from core.prefix_index import PrefixIndex, WorkerKey
from core.routing import RouterCore
from monitor.plots import block_utilisation_series
from monitor.state import MonitorState
from router.stats import worker_samples


class _Stream:  # what worker_samples reads of an ingest stream
    events_applied = event_lag_s = gaps = resets = removed_blocks = 0

    class subscriber:  # noqa: N801
        class counters:  # noqa: N801
            replays = 0


def test_samples_carry_each_targets_registered_capacity_to_the_monitors_plot() -> None:
    """Without the Hello's num_gpu_blocks in the sample, a live cluster's block-utilisation plot drew
    'in use' in % beside 'cached' in blocks ('capacity not reported') and kvr_worker_gpu_blocks read 0."""
    core = RouterCore(policy=get_policy("kvr", block_size=16), index=PrefixIndex(block_size=16), block_size=16)
    a, b = WorkerKey("a", 0), WorkerKey("b", 0)
    core.register(a, capacity_blocks=924)
    core.register(b, capacity_blocks=400)
    samples = worker_samples(core=core, index=core.index, streams={a: _Stream(), b: _Stream()}, t_s=100.0,
                             mirror=None)
    assert {s.worker_id: s.load.num_gpu_blocks for s in samples} == {"a/0": 924, "b/0": 400}
    assert core.capacity_blocks(WorkerKey("gone", 0)) == 0

    state = MonitorState(block_size=16)
    for s in samples:  # as the monitor receives them: over the wire
        state.add(metrics_decoder().decode(encode(s)))
    state.tick(100.0)
    u = block_utilisation_series(state.dump(now_s=101.0))
    assert u["cached_unit"] == "%" and u["capacity_blocks"] == {"a/0": 924, "b/0": 400}


def test_samples_carry_the_free_blocks_the_engine_last_reported() -> None:
    """The monitor's dump showed num_free_blocks 0 for every worker: the router dropped the figure
    from the heartbeats."""
    core = RouterCore(policy=get_policy("kvr", block_size=16), index=PrefixIndex(block_size=16), block_size=16)
    a = WorkerKey("a", 0)
    core.register(a, capacity_blocks=924)
    core.update_load(a, running=2, kv_usage=0.25, num_free_blocks=693)
    core.update_load(WorkerKey("gone", 0), num_free_blocks=5)  # unknown: ignored
    (sample,) = worker_samples(core=core, index=core.index, streams={a: _Stream()}, t_s=1.0, mirror=None)
    assert (sample.load.num_free_blocks, sample.load.num_gpu_blocks, sample.load.running) == (693, 924, 2)
    assert core.free_blocks(WorkerKey("gone", 0)) == 0
