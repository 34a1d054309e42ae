"""Mooncake trace reader and both mappings, on the real traces in traces/."""

from __future__ import annotations

import json

import pytest

from core.metrics import infinite_cache_upper_bound
from core.own_block_hash import block_hashes
from sim.trace import TraceRow, TraceWorkload, load_trace, read_mooncake
from sim.workload import TraceTimes, assign_arrivals


@pytest.fixture(scope="module")
def conversation(traces_dir):
    return read_mooncake(traces_dir / "mooncake_fast25_conversation_trace.jsonl")


@pytest.fixture(scope="module")
def synthetic(traces_dir):
    return read_mooncake(traces_dir / "mooncake_fast25_synthetic_trace.jsonl")


def test_real_traces_row_and_block_counts(conversation, synthetic):
    rows, bad = conversation
    assert (len(rows), bad) == (12031, 0)
    assert sum(len(r.hash_ids) for r in rows) == 288500
    assert rows[0].hash_ids[0] == 0 and rows[-1].timestamp_ms / 1000 == pytest.approx(3537, abs=1)
    srows, sbad = synthetic
    assert (len(srows), sbad) == (3993, 0)
    assert sum(len(r.hash_ids) for r in srows) == 121877


def test_compressed_mapping_bound_equals_block_level_rate(conversation, synthetic):
    # One id -> one 16-token block: the token hit rate with the vLLM cap is the
    # block-level rate of the trace, minus the last-token cap on fully hit rows.
    for (rows, _), block_level in ((conversation, 0.3664), (synthetic, 0.6396)):
        wl = TraceWorkload(rows, mapping="compressed")
        ub = infinite_cache_upper_bound(wl.block_hash_stream(), block_size=16, last_token_recomputed=False)
        assert ub == pytest.approx(block_level, abs=6e-5)


def test_faithful_mapping_reproduces_token_level_bound(synthetic):
    rows, _ = synthetic
    wl = TraceWorkload(rows, mapping="faithful")
    ub = infinite_cache_upper_bound(wl.block_hash_stream(), block_size=16, last_token_recomputed=False)
    assert ub == pytest.approx(0.6512, abs=6e-5)


def test_faithful_tokens_are_per_id_and_hashes_match_direct_hashing():
    rows = [
        TraceRow(0.0, 1000, 10, (3, 4)),  # 512 + 488 tokens: 30 full blocks of id 4
        TraceRow(1500.0, 1030, 20, (3, 4, 9)),  # id 4 full now, then 6 tokens of id 9
    ]
    wl = TraceWorkload(rows, mapping="faithful")
    (a,) = wl.root_requests(0)
    (b,) = wl.root_requests(1)
    assert len(a.token_ids) == 1000 and len(b.token_ids) == 1030
    assert a.token_ids[:512] == list(range(3 * 512, 4 * 512))
    assert b.token_ids[512:1024] == list(range(4 * 512, 5 * 512))
    assert a.token_ids == b.token_ids[:1000]
    assert a.block_hashes == block_hashes(a.token_ids, block_size=16)
    assert b.block_hashes == block_hashes(b.token_ids, block_size=16)
    assert len(a.block_hashes) == 62 and len(b.block_hashes) == 64
    assert (a.max_tokens, b.max_tokens) == (10, 20)
    assert assign_arrivals(wl, TraceTimes(speedup=3.0), None) == [0.0, 0.5]


def test_compressed_tokens_and_output_scaling():
    rows = [TraceRow(10.0, 1000, 500, (3, 4)), TraceRow(20.0, 600, 5, (3, 7))]
    wl = TraceWorkload(rows, mapping="compressed")
    (a,) = wl.root_requests(0)
    (b,) = wl.root_requests(1)
    assert a.token_ids == list(range(48, 64)) + list(range(64, 80))
    assert b.token_ids[:16] == a.token_ids[:16] and b.token_ids[16:] == list(range(112, 128))
    assert a.block_hashes == block_hashes(a.token_ids, block_size=16)
    assert a.block_hashes[0] == b.block_hashes[0] != a.block_hashes[1]
    assert (a.max_tokens, b.max_tokens) == (16, 1)  # ceil(500/32), max(1, ceil(5/32))
    assert wl.root_arrival_s(1) == pytest.approx(0.01)


def test_malformed_rows_are_counted_and_skipped(tmp_path):
    p = tmp_path / "t.jsonl"
    good = {"timestamp": 5, "input_length": 20, "output_length": 3, "hash_ids": [1]}
    p.write_text("\n".join([json.dumps(good), "{not json", json.dumps({"timestamp": 1}),
                            json.dumps({**good, "hash_ids": []}), ""]) + "\n")
    rows, bad = read_mooncake(p)
    assert bad == 3 and rows == [TraceRow(5.0, 20, 3, (1,))]
    wl = load_trace(p, mapping="faithful")
    assert wl.name == "t" and wl.num_roots() == 1
    with pytest.raises(ValueError):
        TraceWorkload(rows, mapping="other")
