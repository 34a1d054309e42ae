"""PrefixIndex: exact event semantics, orphans, tentative entries, dumps, and a naive model."""

from __future__ import annotations

import random

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.vllm_codec import VllmEventDecoder
from core.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from core.own_block_hash import block_hashes
from core.prefix_index import (
    Confidence,
    IndexDelta,
    PrefixIndex,
    SnapshotBlocks,
    WorkerKey,
    request_block_hashes,
)

BS = 4
A = WorkerKey("a", 0)
B = WorkerKey("b", 0)
C = WorkerKey("c", 1)


def ext_of(tokens: list[int]) -> int:
    """A stand-in engine hash: any function of the whole prefix (here xxh64 with another seed)."""
    return xxhash.xxh64_intdigest(repr(tokens).encode(), seed=7)


def stored(tokens: list[int], start_block: int, n_blocks: int, **kw) -> BlockStored:
    """BlockStored for blocks [start_block, start_block+n_blocks) of ``tokens``."""
    parent = None if start_block == 0 else ext_of(tokens[: start_block * BS])
    hashes = [ext_of(tokens[: (i + 1) * BS]) for i in range(start_block, start_block + n_blocks)]
    fields = dict(block_hashes=hashes, parent_block_hash=parent,
                  token_ids=tokens[start_block * BS:(start_block + n_blocks) * BS], block_size=BS,
                  lora_id=None, medium="GPU", lora_name=None)
    fields.update(kw)
    return BlockStored(**fields)


def removed(tokens: list[int], *blocks: int) -> BlockRemoved:
    return BlockRemoved(block_hashes=[ext_of(tokens[: (i + 1) * BS]) for i in blocks], medium="GPU")


TOK = list(range(100, 124))  # 6 blocks
OWN = block_hashes(TOK, block_size=BS)


def test_chained_stores_give_own_hashes_and_overlap():
    idx = PrefixIndex(block_size=BS)
    idx.apply(A, stored(TOK, 0, 2), now=0)
    idx.apply(A, stored(TOK, 2, 2), now=0)
    idx.apply(B, stored(TOK, 0, 1), now=0)
    assert idx.snapshot(A) == sorted((ext_of(TOK[: (i + 1) * BS]), OWN[i]) for i in range(4))
    assert idx.overlap(OWN) == {A: 4, B: 1}
    assert idx.overlap(OWN[:3]) == {A: 3, B: 1}
    assert idx.overlap(block_hashes([9] * 8, block_size=BS)) == {}
    assert idx.overlap([]) == {}
    assert (idx.num_blocks(A), idx.num_blocks(B), idx.total_blocks(), idx.num_unique_blocks()) == (4, 1, 5, 4)
    assert idx.holders(OWN[0]) == [A, B]


def test_overlap_counts_only_leading_blocks():
    idx = PrefixIndex(block_size=BS)
    idx.apply(A, stored(TOK, 0, 4), now=0)
    idx.apply(A, removed(TOK, 1), now=0)  # a hole at block 1: only block 0 leads
    assert idx.overlap(OWN) == {A: 1}
    assert idx.num_blocks(A) == 3


def test_removed_unknown_and_duplicate_stores_are_counted_not_errors():
    idx = PrefixIndex(block_size=BS)
    idx.apply(A, removed(TOK, 0), now=0)
    idx.apply(A, stored(TOK, 0, 2), now=0)
    idx.apply(A, stored(TOK, 0, 2), now=0)  # kv_cache_report_mode="full" re-report
    assert idx.counters["removed_unknown"] == 1
    assert idx.counters["stored_duplicate"] == 2
    assert idx.num_blocks(A) == 2
    idx.apply(A, removed(TOK, 0, 1), now=0)
    assert idx.num_blocks(A) == 0 and idx.overlap(OWN) == {}
    assert idx.num_unique_blocks() == 0


def test_two_external_hashes_for_one_own_hash_need_two_removals():
    idx = PrefixIndex(block_size=BS)
    ev = stored(TOK, 0, 1)
    idx.apply(A, ev, now=0)
    idx.apply(A, BlockStored([12345], None, TOK[:BS], BS, None, "GPU", None), now=0)
    assert idx.num_blocks(A) == 1
    idx.apply(A, BlockRemoved([12345], "GPU"), now=0)
    assert idx.overlap(OWN) == {A: 1}
    idx.apply(A, removed(TOK, 0), now=0)
    assert idx.overlap(OWN) == {}
    assert idx.num_blocks(A) == 0


def test_all_blocks_cleared_clears_one_target_only():
    idx = PrefixIndex(block_size=BS)
    for t in (A, B):
        idx.apply(t, stored(TOK, 0, 3), now=0)
    delta = IndexDelta()
    idx.apply(A, AllBlocksCleared(), now=0, delta=delta)
    assert delta.cleared == [A]
    assert idx.overlap(OWN) == {B: 3}
    assert idx.num_blocks(A) == 0 and A in idx.targets()


def test_ignored_events_are_counted():
    idx = PrefixIndex(block_size=BS)
    idx.apply(A, stored(TOK, 0, 1, medium="CPU"), now=0)
    idx.apply(A, BlockStored([1], None, [], 0, None, "CPU", None), now=0)  # offload placeholder
    idx.apply(A, stored(TOK, 0, 1, kv_cache_spec_kind="sliding_window", group_idx=1), now=0)
    idx.apply(A, BlockStored([1], None, TOK[:16], 16, None, "GPU", None), now=0)  # block size 16 != 4
    idx.apply(A, BlockStored([1, 2], None, TOK[:4], BS, None, "GPU", None), now=0)  # 2 hashes, 1 block
    idx.apply(A, BlockRemoved([ext_of(TOK[:4])], "CPU"), now=0)
    idx.apply(A, "not an event", now=0)
    c = idx.counters
    assert (c["ignored_offload"], c["ignored_group"], c["block_size_mismatch"], c["malformed"], c["unknown_event"]) == (
        3, 1, 1, 1, 1)
    assert idx.total_blocks() == 0


def test_removal_from_another_kv_cache_group_does_not_remove():
    idx = PrefixIndex(block_size=BS)
    idx.apply(A, stored(TOK, 0, 2, group_idx=0, kv_cache_spec_kind="full_attention"), now=0)
    ev = removed(TOK, 0)
    idx.apply(A, BlockRemoved(ev.block_hashes, "GPU", group_idx=1), now=0)  # sliding-window group
    assert idx.overlap(OWN) == {A: 2}
    idx.apply(A, BlockRemoved(ev.block_hashes, "GPU", group_idx=0), now=0)
    assert idx.overlap(OWN) == {}


def test_per_block_extra_keys_match_request_hashes():
    idx = PrefixIndex(block_size=BS)
    # LoRA on every block, the salt on block 0 only: vLLM 0.33's wire form.
    keys = [["sql-lora", "s1"], ["sql-lora"], ["sql-lora"]]
    idx.apply(A, stored(TOK, 0, 3, extra_keys=keys, lora_name="sql-lora"), now=0)
    lora_only = stored(TOK, 0, 3, extra_keys=[["sql-lora"]] * 3, lora_name="sql-lora")
    idx.apply(B, lora_only, now=0)
    salted = request_block_hashes(TOK, block_size=BS, lora_name="sql-lora", cache_salt="s1")
    plain_lora = request_block_hashes(TOK, block_size=BS, lora_name="sql-lora")
    assert idx.overlap(salted) == {A: 3}
    assert idx.overlap(plain_lora) == {B: 3}
    assert idx.overlap(OWN) == {}
    assert request_block_hashes(TOK, block_size=BS) == OWN
    assert request_block_hashes(TOK, block_size=BS, cache_salt="s", max_blocks=2) == \
        request_block_hashes(TOK, block_size=BS, cache_salt="s")[:2]


def test_orphan_is_parked_then_linked_when_parent_arrives():
    idx = PrefixIndex(block_size=BS)
    idx.apply(A, stored(TOK, 4, 2), now=0.0)  # grandchild first
    idx.apply(A, stored(TOK, 2, 2), now=0.1)  # child
    assert idx.overlap(OWN) == {}
    assert idx.orphan_blocks(A) == 4
    assert idx.confidence(A) is Confidence.RESYNCING
    delta = IndexDelta()
    idx.apply(A, stored(TOK, 0, 2), now=0.2, delta=delta)  # root links both, recursively
    assert idx.overlap(OWN) == {A: 6}
    assert [own for _, _, own in delta.stored] == OWN
    assert idx.orphan_blocks(A) == 0 and idx.confidence(A) is Confidence.FRESH
    assert idx.counters["orphan_blocks_linked"] == 4


def test_parked_block_removed_before_link_is_skipped():
    idx = PrefixIndex(block_size=BS)
    idx.apply(A, stored(TOK, 1, 3), now=0)
    idx.apply(A, removed(TOK, 2), now=0)
    idx.apply(A, stored(TOK, 0, 1), now=0)
    assert idx.overlap(OWN) == {A: 2}
    assert sorted(o for _, o in idx.snapshot(A)) == sorted([OWN[0], OWN[1], OWN[3]])
    assert idx.counters["removed_parked"] == 1


def test_orphans_expire_and_are_bounded():
    idx = PrefixIndex(block_size=BS, orphan_ttl_s=10.0, max_orphan_blocks=3)
    idx.apply(A, stored(TOK, 1, 1), now=0)
    idx.apply(A, stored(TOK, 3, 2), now=1)
    assert idx.orphan_blocks(A) == 3
    idx.apply(A, stored(TOK, 5, 1), now=2)  # 4 > 3: the oldest parked chain goes
    assert idx.orphan_blocks(A) == 3 and idx.counters["orphan_blocks_dropped"] == 1
    idx.expire(now=11.5)
    assert idx.orphan_blocks(A) == 1
    idx.expire(now=12.0)
    assert idx.orphan_blocks(A) == 0 and idx.confidence(A) is Confidence.FRESH
    idx.apply(A, stored(TOK, 0, 2), now=13)  # parents arrive too late: nothing links
    assert idx.overlap(OWN) == {A: 2}


def test_confidence_is_set_by_router_and_raised_by_orphans():
    idx = PrefixIndex(block_size=BS)
    assert idx.confidence(A) is Confidence.STALE  # unknown target
    idx.set_confidence(A, Confidence.STALE)
    idx.apply(A, stored(TOK, 1, 1), now=0)
    assert idx.confidence(A) is Confidence.STALE
    idx.set_confidence(A, "fresh")
    assert idx.confidence(A) is Confidence.RESYNCING


def test_tentative_entries_count_until_expiry_or_settled():
    idx = PrefixIndex(block_size=BS)
    idx.apply(A, stored(TOK, 0, 2), now=0)
    idx.add_tentative(A, OWN[:4], expires_at=5.0)
    idx.add_tentative(B, OWN[:2], expires_at=3.0)
    assert idx.num_tentative() == 4  # A's two real blocks are not tentative
    assert idx.overlap(OWN, now=1.0) == {A: 4, B: 2}
    idx.apply(A, stored(TOK, 2, 1), now=1.5)  # settles A's block 2
    assert idx.num_tentative() == 3
    assert idx.overlap(OWN, now=3.0) == {A: 4}
    idx.apply(A, removed(TOK, 1), now=3.5)  # a real removal cuts the lead, tentative or not
    assert idx.overlap(OWN, now=3.5) == {A: 1}
    assert idx.overlap(OWN, now=5.0) == {A: 1}
    assert idx.num_tentative() == 0
    idx.apply(A, stored(TOK, 1, 1), now=5.0)
    assert idx.overlap(OWN, now=5.0) == {A: 3}
    idx.add_tentative(B, OWN[:2], expires_at=9.0)
    idx.add_tentative(B, OWN[:2], expires_at=7.0)  # an earlier expiry never shortens
    assert idx.overlap(OWN, now=8.0) == {A: 3, B: 2}
    idx.clear_target(B)
    assert idx.overlap(OWN, now=8.0) == {A: 3} and idx.num_tentative() == 0


def test_remove_target_frees_slot_for_reuse():
    idx = PrefixIndex(block_size=BS)
    idx.apply(A, stored(TOK, 0, 2), now=0)
    idx.apply(B, stored(TOK, 0, 1), now=0)
    idx.remove_target(A)
    assert idx.targets() == [B] and idx.overlap(OWN) == {B: 1}
    idx.apply(C, stored(TOK, 0, 3), now=0)  # reuses A's slot
    assert idx.overlap(OWN) == {B: 1, C: 3}
    idx.remove_target(A)  # unknown: no-op


def test_dump_events_restore_exactly_including_orphans():
    idx = PrefixIndex(block_size=BS)
    other = list(range(500, 512))
    idx.apply(A, stored(TOK, 0, 3), now=0)
    idx.apply(A, stored(other, 1, 2), now=0)  # parked
    idx.apply(A, removed(other, 2), now=0)
    events = idx.dump_events(A)
    assert isinstance(events[0], SnapshotBlocks)
    fresh = PrefixIndex(block_size=BS)
    for ev in events:
        fresh.apply(A, ev, now=1)
    assert fresh.snapshot(A) == idx.snapshot(A)
    assert fresh.orphan_blocks(A) == idx.orphan_blocks(A) == 2
    for t in (idx, fresh):
        t.apply(A, stored(other, 0, 1), now=2)
    assert fresh.snapshot(A) == idx.snapshot(A)
    assert fresh.overlap(block_hashes(other, block_size=BS)) == {A: 2}


def test_vllm_fixtures_land_in_the_index(fixtures_dir):
    decoder = VllmEventDecoder()
    idx = PrefixIndex(block_size=16)
    batch = decoder.decode((fixtures_dir / "02_stored_chain_3.bin").read_bytes())
    idx.apply_batch("vllm-pod-0", batch, now=0)
    tokens = [t for ev in batch.events for t in ev.token_ids]
    own = request_block_hashes(tokens, block_size=16)
    assert idx.overlap(own) == {WorkerKey("vllm-pod-0", 0): 3}
    lora = decoder.decode((fixtures_dir / "09_lora.bin").read_bytes())
    idx.apply_batch("vllm-pod-1", lora, now=0)
    lora_tokens = lora.events[0].token_ids
    assert idx.overlap(request_block_hashes(lora_tokens, block_size=16, lora_name="sql-lora")) == {
        WorkerKey("vllm-pod-1", 0): 2}
    # The same tokens without the adapter are pod-0's plain blocks, never pod-1's LoRA blocks.
    assert idx.overlap(request_block_hashes(lora_tokens, block_size=16)) == {WorkerKey("vllm-pod-0", 0): 2}
    mixed = decoder.decode((fixtures_dir / "07_mixed.bin").read_bytes())
    idx.apply_batch("vllm-pod-0", mixed, now=0)  # ends with AllBlocksCleared
    assert idx.num_blocks(WorkerKey("vllm-pod-0", 0)) == 0


# ------------------------------------------------------------------ property tests against a naive model

PROMPTS = [[p * 1000 + t for t in range(6 * BS)] for p in range(3)]
# Prompts 3 and 4 share prompt 0's first two blocks.
PROMPTS += [PROMPTS[0][: 2 * BS] + [7000 + t for t in range(4 * BS)],
            PROMPTS[0][: 2 * BS] + [8000 + t for t in range(4 * BS)]]

op = st.one_of(
    st.tuples(st.just("store"), st.integers(0, 2), st.integers(0, len(PROMPTS) - 1), st.integers(0, 5),
              st.integers(1, 3)),
    st.tuples(st.just("remove"), st.integers(0, 2), st.integers(0, len(PROMPTS) - 1), st.integers(0, 5)),
    st.tuples(st.just("clear"), st.integers(0, 2)),
)
TARGETS = [A, B, C]


@settings(max_examples=150)
@given(st.lists(op, max_size=40))
def test_random_streams_equal_naive_model(ops):
    idx = PrefixIndex(block_size=BS)
    model: dict[WorkerKey, set[tuple[int, ...]]] = {t: set() for t in TARGETS}  # present block prefixes
    for o in ops:
        t = TARGETS[o[1]]
        if o[0] == "store":
            _, _, p, start, n = o
            tokens = PROMPTS[p]
            n = min(n, 6 - start)
            if start > 0 and tuple(tokens[: start * BS]) not in model[t]:
                continue  # the model has no orphans: keep streams parent-first
            idx.apply(t, stored(tokens, start, n), now=0)
            model[t].update(tuple(tokens[: (i + 1) * BS]) for i in range(start, start + n))
        elif o[0] == "remove":
            _, _, p, blk = o
            idx.apply(t, removed(PROMPTS[p], blk), now=0)
            model[t].discard(tuple(PROMPTS[p][: (blk + 1) * BS]))
        else:
            idx.apply(t, AllBlocksCleared(), now=0)
            model[t].clear()
    for t in TARGETS:
        want = sorted((ext_of(list(pre)), block_hashes(list(pre), block_size=BS)[-1]) for pre in model[t])
        assert idx.snapshot(t) == want
        assert idx.num_blocks(t) == len(model[t])
    for tokens in PROMPTS:
        own = block_hashes(tokens, block_size=BS)
        want = {}
        for t in TARGETS:
            k = 0
            while k < 6 and tuple(tokens[: (k + 1) * BS]) in model[t]:
                k += 1
            if k:
                want[t] = k
        assert idx.overlap(own) == want


@settings(max_examples=100)
@given(st.randoms(use_true_random=False))
def test_reordered_stores_converge_to_in_order_result(rnd: random.Random):
    events = []
    for p in range(len(PROMPTS)):
        start = 0
        while start < 6:
            n = rnd.randint(1, 6 - start)
            events.append(stored(PROMPTS[p], start, n))
            start += n
    in_order = PrefixIndex(block_size=BS)
    for ev in events:
        in_order.apply(A, ev, now=0)
    shuffled = events[:]
    rnd.shuffle(shuffled)
    idx = PrefixIndex(block_size=BS)
    for ev in shuffled:
        idx.apply(A, ev, now=0)
    assert idx.snapshot(A) == in_order.snapshot(A)
    assert idx.orphan_blocks(A) == 0


def test_bad_block_size_rejected():
    with pytest.raises(ValueError):
        PrefixIndex(block_size=0)


def test_batch_rank_selects_target():
    idx = PrefixIndex(block_size=BS)
    idx.apply_batch("w", KVEventBatch(0.0, [stored(TOK, 0, 1)], 3), now=0)
    idx.apply_batch("w", KVEventBatch(0.0, [stored(TOK, 0, 2)], None), now=0)
    assert idx.overlap(OWN) == {WorkerKey("w", 3): 1, WorkerKey("w", 0): 2}
