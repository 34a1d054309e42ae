"""Latency models, profiles and the KV capacity calculator."""

from __future__ import annotations

import pytest

from core.latency import LatencyModel, SimpleLatencyModel, StepLatencyModel, kv_read_per_token_s
from core.profiles import GIB, MIB, PROFILES, get_profile, kv_block_bytes, kv_capacity_blocks


def test_a100_40gb_with_a_13b_model_at_0_9_gives_about_924_blocks() -> None:
    # OPT-13B: 40 layers x 40 KV heads x 128, bf16 -> 12.5 MiB per 16-token block (§4).
    assert kv_block_bytes(layers=40, kv_heads=40, head_dim=128, dtype_bytes=2, block_size=16) == 12.5 * MIB
    blocks = kv_capacity_blocks(39.39, 0.9, 23.94, 40, 40, 128, 2, 16, non_kv_gib=0.22)
    assert blocks == 924
    # Without the activation allowance the same GPU holds ~942; the formula is linear in memory.
    assert kv_capacity_blocks(39.39, 0.9, 23.94, 40, 40, 128, 2, 16) == int((39.39 * 0.9 - 23.94) * GIB // (12.5 * MIB))
    assert get_profile("a100-40gb-13b").num_gpu_blocks == 924


def test_capacity_edge_cases() -> None:
    assert kv_capacity_blocks(16, 0.5, 14.96, 32, 8, 128, 2, 16) == 0  # weights do not fit
    with pytest.raises(ValueError):
        kv_capacity_blocks(80, 1.5, 10, 32, 8, 128, 2, 16)
    # Llama-3-8B on an 80 GB GPU at 0.9: ~27.8k blocks (§4).
    assert 27_000 < get_profile("a100-80gb-8b").num_gpu_blocks < 29_000


def test_simple_model_is_the_seeds_formula() -> None:
    m = SimpleLatencyModel(prefill_base_s=0.010, prefill_per_block_s=0.002, decode_per_token_s=0.020, block_size=16)
    assert m.prefill_s(new_tokens=33) == pytest.approx(0.010 + 3 * 0.002)
    assert m.prefill_s(new_tokens=0) == 0.0
    assert m.decode_token_s(batch_size=64, kv_tokens=10**6) == 0.020
    assert m.step_s(prefill_tokens=16, decode_seqs=5, kv_tokens=0) == pytest.approx(0.012 + 0.020)
    assert m.step_s(prefill_tokens=0, decode_seqs=0, kv_tokens=0) == 0.0


def test_step_model_pays_the_base_once_and_adds_linear_terms() -> None:
    m = StepLatencyModel(
        step_overhead_s=0.001, prefill_base_s=0.010, prefill_per_token_s=1e-4, decode_floor_s=0.008,
        decode_per_seq_s=1e-5, kv_read_per_token_s=1e-7, attention_per_token_pair_s=1e-9,
    )  # fmt: skip
    assert m.decode_token_s(batch_size=4, kv_tokens=1000) == pytest.approx(0.001 + 0.008 + 4e-5 + 1e-4)
    assert m.prefill_s(new_tokens=100, cached_tokens=900) == pytest.approx(
        0.001 + 0.010 + 100 * 1e-4 + 900 * 1e-7 + 100 * 1000 * 1e-9
    )
    mixed = m.step_s(prefill_tokens=100, decode_seqs=4, kv_tokens=1000)
    assert mixed == pytest.approx(0.001 + 0.010 + 100 * 1e-4 + 4e-5 + 1000 * 1e-7)
    assert m.step_s(prefill_tokens=0, decode_seqs=0, kv_tokens=0) == 0.0


def test_kv_read_time_is_bytes_over_effective_bandwidth() -> None:
    assert kv_read_per_token_s(kv_bytes_per_token=128 * 1024, hbm_bytes_per_s=2.0e12) == pytest.approx(131072 / 1.6e12)


@pytest.mark.parametrize("name", ["simple", "a100-40gb-13b", "a100-80gb-8b", "h100-8b"])
def test_profiles_match_the_calibration_table(name: str) -> None:
    p = get_profile(name)
    assert isinstance(p.latency, LatencyModel)
    assert p.source and p.block_size == 16 and p.max_num_seqs > 0
    desc = p.describe()
    assert desc["capacity_tokens"] == p.num_gpu_blocks * 16
    # §3.2: batch-1 decode ms/token and per-block prefill, within 10 %.
    expected = {"simple": (20, 2.0), "a100-40gb-13b": (20, 2.0), "a100-80gb-8b": (11, 1.05), "h100-8b": (7, 0.39)}[name]
    decode_ms = p.latency.decode_token_s(batch_size=1, kv_tokens=2048) * 1e3
    per_block_ms = (p.latency.prefill_s(new_tokens=1024) - p.latency.prefill_s(new_tokens=512)) / 32 * 1e3
    assert decode_ms == pytest.approx(expected[0], rel=0.1)
    assert per_block_ms == pytest.approx(expected[1], rel=0.1)


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="h100-8b"):
        get_profile("nope")
    assert {"simple", "a100-40gb-13b", "a100-80gb-8b", "h100-8b"} <= set(PROFILES)
