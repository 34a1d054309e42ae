"""The block pool pins vLLM v1's prefix-caching behaviour: orders, events, invariants."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.vllm_codec import encode_batch
from core.block_pool import BlockHasher, BlockPool, KVSequence
from core.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from core.own_block_hash import block_hashes as kvr_block_hashes

BS = 4


def pool_of(num_blocks: int, **kw) -> BlockPool:
    return BlockPool(num_blocks=num_blocks, block_size=BS, **kw)


def schedule_prompt(pool: BlockPool, seq: KVSequence) -> list[int] | None:
    """First scheduling of a whole prompt, as the engine does it; returns block ids."""
    hits, n_hit = pool.get_computed_blocks(seq)
    new = pool.allocate_slots(
        seq, seq.num_tokens - n_hit, num_new_computed_tokens=n_hit, new_computed_blocks=hits
    )
    if new is None:
        return None
    seq.num_computed_tokens = seq.num_tokens
    return [b.block_id for b in seq.blocks]


def ext(pool: BlockPool, seq: KVSequence, i: int) -> int:
    return pool.hasher.external(seq.block_hashes[i])


def stored(pool: BlockPool, seq: KVSequence, start: int, end: int) -> BlockStored:
    return BlockStored(
        block_hashes=[ext(pool, seq, i) for i in range(start, end)],
        parent_block_hash=ext(pool, seq, start - 1) if start else None,
        token_ids=seq.token_ids[start * BS : end * BS],
        block_size=BS,
        lora_id=None,
        medium="GPU",
        lora_name=None,
        extra_keys=[None] * (end - start),
        group_idx=0,
        kv_cache_spec_kind="full_attention",
    )


def removed(pool: BlockPool, seq: KVSequence, i: int) -> BlockRemoved:
    return BlockRemoved(block_hashes=[ext(pool, seq, i)], medium="GPU", group_idx=0)


# --------------------------------------------------------------------------- basics


def test_fresh_pool_holds_back_the_null_block() -> None:
    pool = pool_of(6)
    assert pool.free_block_queue.block_ids() == [1, 2, 3, 4, 5]
    assert (pool.num_usable_blocks, pool.num_free_blocks, pool.usage) == (5, 5, 0.0)
    with pytest.raises(ValueError):
        pool_of(1)


def test_new_blocks_come_from_the_head_and_full_ones_are_stored_at_scheduling() -> None:
    pool = pool_of(11)
    seq = pool.new_sequence("a", list(range(10)))
    assert len(seq.block_hashes) == 2  # the trailing 2 tokens are no full block
    assert schedule_prompt(pool, seq) == [1, 2, 3]
    assert pool.drain_events() == [stored(pool, seq, 0, 2)]
    assert pool.drain_events() == []
    assert pool.usage == pytest.approx(0.3)
    assert [b.ref_cnt for b in pool.blocks[1:5]] == [1, 1, 1, 0]


def test_free_puts_unhashed_blocks_at_the_head_and_cached_ones_at_the_tail_last_first() -> None:
    pool = pool_of(11)
    seq = pool.new_sequence("a", list(range(10)))
    schedule_prompt(pool, seq)
    pool.free(seq)
    # Block 3 (partial, no hash) is reused first; cached blocks join the LRU tail
    # last-block-first, so block 2 is evicted before block 1.
    assert pool.free_block_queue.block_ids() == [3, 4, 5, 6, 7, 8, 9, 10, 2, 1]
    assert pool.drain_events() == [stored(pool, seq, 0, 2)]  # nothing removed on free


def test_a_hit_on_free_cached_blocks_takes_them_out_of_the_free_queue() -> None:
    pool = pool_of(11)
    a = pool.new_sequence("a", list(range(10)))
    schedule_prompt(pool, a)
    pool.free(a)
    pool.drain_events()
    b = pool.new_sequence("b", list(range(10)))
    hits, n_hit = pool.get_computed_blocks(b)
    assert ([h.block_id for h in hits], n_hit) == ([1, 2], 8)
    new = pool.allocate_slots(b, 2, num_new_computed_tokens=8, new_computed_blocks=hits)
    assert [x.block_id for x in new] == [3]
    assert [x.block_id for x in b.blocks] == [1, 2, 3]
    assert pool.free_block_queue.block_ids() == [4, 5, 6, 7, 8, 9, 10]
    assert pool.drain_events() == []  # hit blocks are not stored again
    assert (pool.stats.queries_tokens, pool.stats.hits_tokens) == (20, 8)


def test_the_last_prompt_token_is_always_computed_so_an_aligned_repeat_duplicates_its_last_block() -> None:
    pool = pool_of(11)
    a = pool.new_sequence("a", list(range(8)))
    schedule_prompt(pool, a)
    b = pool.new_sequence("b", list(range(8)))
    hits, n_hit = pool.get_computed_blocks(b)
    assert ([h.block_id for h in hits], n_hit) == ([1], 4)
    pool.allocate_slots(b, 4, num_new_computed_tokens=4, new_computed_blocks=hits)
    assert [x.block_id for x in b.blocks] == [1, 3]
    # vLLM does not de-duplicate: block 3 is cached under the same hash as block 2.
    assert pool.drain_events() == [stored(pool, a, 0, 2), stored(pool, b, 1, 2)]
    assert pool.num_cached_hashes == 2
    assert [x.block_id for x in pool.cached_blocks()] == [1, 2, 3]
    # A lookup returns the first holder; evicting it leaves the duplicate cached.
    pool.free(a)
    pool.free(b)
    assert pool.free_block_queue.block_ids() == [4, 5, 6, 7, 8, 9, 10, 2, 3, 1]


def test_eviction_is_lazy_lru_and_emits_one_removed_per_hash_in_eviction_order() -> None:
    pool = pool_of(5)  # 4 usable blocks
    a = pool.new_sequence("a", list(range(9)))
    assert schedule_prompt(pool, a) == [1, 2, 3]
    pool.free(a)
    assert pool.free_block_queue.block_ids() == [3, 4, 2, 1]
    b = pool.new_sequence("b", list(range(100, 113)))
    assert schedule_prompt(pool, b) == [3, 4, 2, 1]
    assert pool.drain_events() == [
        stored(pool, a, 0, 2),
        removed(pool, a, 1),  # a's last full block goes first
        removed(pool, a, 0),
        stored(pool, b, 0, 3),
    ]
    assert pool.num_free_blocks == 0 and pool.usage == 1.0


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    pool = pool_of(5)
    a = pool.new_sequence("a", list(range(9)))
    schedule_prompt(pool, a)
    pool.free(a)
    pool.drain_events()
    # The 2 hits are free, so they count against the free blocks: 2 + 3 new > 4.
    b = pool.new_sequence("b", list(range(8)) + list(range(200, 212)))
    hits, n_hit = pool.get_computed_blocks(b)
    assert n_hit == 8
    assert pool.num_blocks_to_allocate(b, b.num_tokens, hits) == 5
    assert pool.allocate_slots(b, b.num_tokens - 8, num_new_computed_tokens=8, new_computed_blocks=hits) is None
    assert pool.free_block_queue.block_ids() == [3, 4, 2, 1]
    assert [x.ref_cnt for x in pool.blocks] == [0, 0, 0, 0, 0]
    assert pool.drain_events() == []


def test_decode_caches_a_block_when_the_token_that_fills_it_is_scheduled() -> None:
    pool = pool_of(11)
    seq = pool.new_sequence("a", list(range(7)))
    schedule_prompt(pool, seq)
    assert pool.drain_events() == [stored(pool, seq, 0, 1)]
    pool.append_token_ids(seq, [500])  # sampled token; seq now has 2 full blocks
    assert len(seq.block_hashes) == 2
    assert pool.allocate_slots(seq, 1) == []  # slot 8 is still in block 2
    seq.num_computed_tokens += 1
    assert pool.drain_events() == [stored(pool, seq, 1, 2)]
    pool.append_token_ids(seq, [501])
    assert [b.block_id for b in pool.allocate_slots(seq, 1)] == [3]
    assert pool.drain_events() == []


def test_chunked_prefill_stores_each_chunk_with_its_parent() -> None:
    pool = pool_of(11)
    seq = pool.new_sequence("a", list(range(14)))
    hits, n_hit = pool.get_computed_blocks(seq)
    pool.allocate_slots(seq, 6, num_new_computed_tokens=n_hit, new_computed_blocks=hits)
    seq.num_computed_tokens = 6
    pool.allocate_slots(seq, 8)
    seq.num_computed_tokens = 14
    assert [b.block_id for b in seq.blocks] == [1, 2, 3, 4]
    assert pool.drain_events() == [stored(pool, seq, 0, 1), stored(pool, seq, 1, 3)]


def test_reset_prefix_cache_is_refused_while_blocks_are_in_use() -> None:
    pool = pool_of(6)
    seq = pool.new_sequence("a", list(range(9)))
    schedule_prompt(pool, seq)
    pool.drain_events()
    assert pool.reset_prefix_cache() is False
    assert pool.drain_events() == []
    pool.free(seq)
    assert pool.reset_prefix_cache() is True
    assert pool.drain_events() == [AllBlocksCleared()]
    assert pool.cached_blocks() == [] and pool.num_cached_hashes == 0
    again = pool.new_sequence("b", list(range(9)))
    assert pool.get_computed_blocks(again) == ([], 0)


def test_without_caching_there_are_no_hits_no_events_and_freed_blocks_are_reused_lifo() -> None:
    pool = pool_of(6, enable_caching=False)
    a = pool.new_sequence("a", list(range(9)))
    schedule_prompt(pool, a)
    pool.free(a)
    assert pool.free_block_queue.block_ids() == [3, 2, 1, 4, 5]
    b = pool.new_sequence("b", list(range(9)))
    assert pool.get_computed_blocks(b) == ([], 0)
    assert pool.drain_events() == []


# --------------------------------------------------------------------------- hashes and wire shape


def test_external_hash_is_the_low_64_bits_of_the_digest_and_not_kvrs_router_hash() -> None:
    pool = pool_of(6)
    seq = pool.new_sequence("a", list(range(16)))
    digests = seq.block_hashes
    assert all(len(d) == 32 for d in digests)  # vLLM's sha256 by default
    ext_hashes = [pool.hasher.external(d) for d in digests]
    assert ext_hashes == [int.from_bytes(d[-8:], "big") for d in digests]
    assert set(ext_hashes).isdisjoint(kvr_block_hashes(list(range(16)), block_size=BS))
    # Chained: the same block after a different parent hashes differently.
    other = pool.new_sequence("b", [99, 98, 97, 96] + list(range(4, 16)))
    assert other.block_hashes[1] != digests[1]


@pytest.mark.parametrize(("algo", "key"), [("vllm-sha256", "sha256_pickle"), ("vllm-sha256-cbor", "sha256_cbor")])
def test_vllm_hash_algorithms_match_vllm_033s_vectors(fixtures_dir, algo, key) -> None:
    vectors = json.loads((fixtures_dir / "hash_vectors.json").read_text())
    hasher = BlockHasher(algo=algo)
    assert hasher.none_hash.hex() == vectors[f"none_hash_{key}"]
    pool = BlockPool(num_blocks=8, block_size=16, hash_fn=hasher)
    seq = pool.new_sequence("v", [t for b in vectors["blocks"] for t in b["token_ids"]])
    assert [d.hex() for d in seq.block_hashes] == [b[f"{key}_hex"] for b in vectors["blocks"]]
    assert [pool.hasher.external(d) for d in seq.block_hashes] == [b[f"{key}_int64"] for b in vectors["blocks"]]
    assert BlockPool(num_blocks=2, block_size=16).hasher.algo == "vllm-sha256"  # the default


def test_cbor_hash_covers_extra_keys_and_rejects_odd_types() -> None:
    h = BlockHasher(algo="vllm-sha256-cbor")
    plain = h.hash_block(None, [1, 2])
    with_lora = h.hash_block(None, [1, 2], (("lora", "a", "a"),))
    assert with_lora != plain != h.hash_block(None, [1, 2], (("cache_salt", "s"),))
    assert h.hash_block(None, [1, 2**40]) != h.hash_block(None, [1, 2**40 + 1])
    with pytest.raises(TypeError):
        h.hash_block(None, [1], ({"a": 1},))


@pytest.mark.parametrize(("fixture", "chunks"), [("01_stored_one_block", [17]), ("03_stored_multi_block", [49]),
                                                 ("02_stored_chain_3", [16, 16, 17])])
def test_stored_event_payload_is_byte_identical_to_vllm_033(fixtures_dir, fixture, chunks) -> None:
    # The fixture prompt's blocks, prefilled in the given chunks (+1 token so every block fills).
    meta = json.loads((fixtures_dir / f"{fixture}.json").read_text())
    vectors = json.loads((fixtures_dir / "hash_vectors.json").read_text())
    tokens = [t for b in vectors["blocks"] for t in b["token_ids"]][: sum(chunks) - 1] + [7]
    pool = BlockPool(num_blocks=8, block_size=16)
    seq = pool.new_sequence("v", tokens)
    for n in chunks:
        pool.allocate_slots(seq, n)
        seq.num_computed_tokens += n
    batch = KVEventBatch(meta["ts"], pool.drain_events(), meta["data_parallel_rank"])
    assert encode_batch(batch) == (fixtures_dir / f"{fixture}.bin").read_bytes()


def test_bytes_mode_and_sha256_digests() -> None:
    raw = BlockHasher(algo="xxh3_128", int_hashes=False)
    d = raw.hash_block(None, [1, 2, 3, 4])
    assert raw.external(d) == d and len(d) == 16
    sha = BlockHasher(algo="sha256")
    d32 = sha.hash_block(None, [1, 2, 3, 4])
    assert len(d32) == 32 and sha.external(d32) == int.from_bytes(d32[-8:], "big")
    assert BlockHasher(seed=1, algo="xxh3_128").hash_block(None, [1, 2, 3, 4]) != BlockHasher(
        seed=2, algo="xxh3_128").hash_block(None, [1, 2, 3, 4])
    with pytest.raises(ValueError):
        BlockHasher(algo="md5")


def test_external_hash_is_stable_across_processes() -> None:
    code = (
        "from core.block_pool import BlockPool; p = BlockPool(num_blocks=4, block_size=4);"
        "s = p.new_sequence('x', list(range(12))); print([p.hasher.external(h) for h in s.block_hashes])"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    here = pool_of(4).new_sequence("x", list(range(12)))
    assert outs == {str([pool_of(4).hasher.external(h) for h in here.block_hashes])}


def test_lora_and_salt_change_hashes_and_appear_as_extra_keys() -> None:
    pool = pool_of(11)
    plain = pool.new_sequence("p", list(range(8)))
    lora = pool.new_sequence("l", list(range(8)), lora_name="ad-a")
    salted = pool.new_sequence("s", list(range(8)), cache_salt="salt1")
    assert len({plain.block_hashes[0], lora.block_hashes[0], salted.block_hashes[0]}) == 3
    # The salt keys block 0 only, yet block 1 differs through the chain.
    assert salted.block_hashes[1] != plain.block_hashes[1]
    schedule_prompt(pool, lora)
    schedule_prompt(pool, salted)
    ev_lora, ev_salt = pool.drain_events()
    assert (ev_lora.lora_name, ev_lora.lora_id, ev_lora.extra_keys) == ("ad-a", 1, [["ad-a"], ["ad-a"]])
    assert (ev_salt.lora_name, ev_salt.lora_id, ev_salt.extra_keys) == (None, None, [["salt1"], None])


def test_stored_event_encodes_with_vllm_033_keys_in_order() -> None:
    pool = pool_of(6)
    seq = pool.new_sequence("a", list(range(4)) + [7])
    schedule_prompt(pool, seq)
    (event,) = pool.drain_events()
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(event))
    assert list(decoded) == [
        "type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
        "medium", "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind",
    ]  # fmt: skip
    assert decoded["extra_keys"] == [None] and decoded["medium"] == "GPU"


# --------------------------------------------------------------------------- invariants


def check_invariants(pool: BlockPool, live: list[KVSequence], index: Counter) -> None:
    free_ids = pool.free_block_queue.block_ids()
    assert len(set(free_ids)) == len(free_ids)
    assert 0 not in free_ids
    in_use = [b for b in pool.blocks[1:] if b.ref_cnt > 0]
    assert len(free_ids) + len(in_use) == pool.num_usable_blocks
    assert all(b.ref_cnt >= 0 for b in pool.blocks)
    assert all(pool.blocks[i].ref_cnt == 0 for i in free_ids)
    # Ref counts equal the number of live requests holding the block.
    holders = Counter(b.block_id for s in live for b in s.blocks)
    assert {b.block_id: b.ref_cnt for b in in_use} == dict(holders)
    # Every cached block is in the map under its own hash, and nothing else is.
    for b in pool.blocks:
        if b.block_hash is not None:
            assert b in pool._cached[b.block_hash]
    assert sum(len(v) for v in pool._cached.values()) == len(pool.cached_blocks())
    # The event stream replayed into a counting index equals the pool.
    assert +index == Counter(pool.hasher.external(b.block_hash) for b in pool.cached_blocks())


def replay(index: Counter, events) -> None:
    for ev in events:
        if isinstance(ev, BlockStored):
            index.update(ev.block_hashes)
        elif isinstance(ev, BlockRemoved):
            for h in ev.block_hashes:
                assert index[h] > 0, "removed a hash that was never stored"
                index[h] -= 1
        else:
            index.clear()


_add = st.tuples(st.just("add"), st.integers(0, 3), st.integers(1, 30), st.integers(1, 12))
_step = st.tuples(st.just("step"), st.integers(0, 7), st.integers(1, 6))
_free = st.tuples(st.just("free"), st.integers(0, 7), st.integers(0, 15))
op = st.one_of(_add, _step, _free)


@settings(max_examples=150)
@given(st.lists(op, min_size=10, max_size=60), st.integers(3, 14))
def test_random_workloads_keep_the_pool_consistent_with_its_events(ops, num_blocks) -> None:
    pool = pool_of(num_blocks)
    prefixes = [list(range(100 * p, 100 * p + 30)) for p in range(4)]
    live: list[KVSequence] = []
    index: Counter = Counter()
    n = 0
    for o in ops:
        if o[0] == "add":
            _, p, length, chunk = o
            n += 1
            seq = pool.new_sequence(f"r{n}", prefixes[p][:length] + [n])
            hits, n_hit = pool.get_computed_blocks(seq)
            k = min(chunk, seq.num_tokens - n_hit)
            if pool.allocate_slots(seq, k, num_new_computed_tokens=n_hit, new_computed_blocks=hits) is not None:
                seq.num_computed_tokens = n_hit + k
                live.append(seq)
        elif o[0] == "step" and live:
            seq = live[o[1] % len(live)]
            if seq.num_computed_tokens == seq.num_tokens:
                pool.append_token_ids(seq, [7000 + seq.num_tokens])
            k = min(o[2], seq.num_tokens - seq.num_computed_tokens)
            if pool.allocate_slots(seq, k) is not None:
                seq.num_computed_tokens += k
        elif o[0] == "free" and live:
            pool.free(live.pop(o[1] % len(live)))
            if o[2] == 0:  # now and then, try a cache reset
                pool.reset_prefix_cache()
        replay(index, pool.drain_events())
        check_invariants(pool, live, index)
