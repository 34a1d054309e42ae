"""EventIngest's per-batch path: the Redis mirror equals the index after every batch.

The batch's net change is read off the index after applying it (``net_change``); these tests pin
the awkward orders inside one batch (store then evict, evict then re-store, clear in the middle,
an external hash remapped) and check the property on random batches with hypothesis.
"""

from __future__ import annotations

from types import SimpleNamespace

import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.stream_items import AppliedBatch
from core.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from core.prefix_index import IndexDelta, PrefixIndex, WorkerKey
from router.ingest import EventIngest, TargetStream, net_change
from router.mirror import RedisMirror

BS = 4
T = WorkerKey("w", 0)


def stored(exts: list[int], first_token: int, parent: int | None = None) -> BlockStored:
    tokens = [first_token + i for i in range(BS * len(exts))]
    return BlockStored(exts, parent, tokens, BS, None, "GPU", None)


def _ingest(client):
    index = PrefixIndex(block_size=BS)
    mirror = RedisMirror(client=client, namespace="n")
    ctx = zmq.Context()
    ingest = EventIngest(index=index, poller=zmq.Poller(), ctx=ctx, mirror=mirror)
    stream = TargetStream(T, 1, SimpleNamespace(replay_in_flight=False))
    return index, mirror, ingest, stream, ctx


def _run(client, batches: list[list]) -> tuple[PrefixIndex, RedisMirror]:
    index, mirror, ingest, stream, ctx = _ingest(client)
    try:
        for seq, events in enumerate(batches):
            ingest._on_item(stream, AppliedBatch(seq, KVEventBatch(float(seq), events, 0)))
            assert mirror.load_snapshot().get(("w", 0), SimpleNamespace(blocks={})).blocks == dict(index.snapshot(T))
    finally:
        ctx.term()
    return index, mirror


def test_net_change_orders_inside_one_batch():
    index = PrefixIndex(block_size=BS)
    delta = IndexDelta()
    for ev in [stored([1, 2], 100), BlockRemoved([1], "GPU"), stored([3], 200), BlockRemoved([3], "GPU"),
               stored([3], 300)]:
        index.apply(T, ev, now=0.0, delta=delta)
    put, gone, cleared = net_change(index, T, delta)
    assert put == {2: index.own_of(T, 2), 3: index.own_of(T, 3)}
    assert gone == {1} and cleared is False
    assert index.own_of(T, 3) != index.own_of(T, 2)


def test_mirror_follows_store_evict_clear_and_remap(fake_redis):
    index, mirror = _run(fake_redis, [
        [stored([1, 2, 3], 100)],
        [BlockRemoved([3], "GPU"), stored([3], 500, parent=2), BlockRemoved([2], "GPU")],
        [stored([7], 900), AllBlocksCleared(), stored([8], 40)],
        [stored([8], 41)],  # the engine reused external hash 8 for other tokens
        [AllBlocksCleared()],
    ])
    assert index.snapshot(T) == []
    assert mirror.load_snapshot()[("w", 0)].blocks == {}


_events = st.lists(
    st.one_of(
        st.builds(lambda exts, tok, parent: stored(exts, tok, parent),
                  st.lists(st.integers(0, 12), min_size=1, max_size=3, unique=True), st.integers(0, 50),
                  st.one_of(st.none(), st.integers(0, 12))),
        st.builds(lambda exts: BlockRemoved(exts, "GPU"), st.lists(st.integers(0, 12), min_size=1, max_size=3)),
        st.just(AllBlocksCleared()),
    ),
    min_size=1, max_size=6,
)


@settings(max_examples=60)
@given(st.lists(_events, min_size=1, max_size=5))
def test_mirror_equals_index_after_every_random_batch(batches):
    import fakeredis

    _run(fakeredis.FakeRedis(), batches)


@settings(max_examples=60)
@given(st.lists(_events, min_size=1, max_size=5))
def test_without_the_mirror_the_stream_counts_the_same_blocks(batches):
    """With no mirror to write, a batch records no delta and the stream's stored and evicted block
    counts come from the index's counters: the same numbers as with the mirror, on any batches
    (orphans, remaps, duplicates, clears)."""
    import fakeredis

    counts = []
    for client in (fakeredis.FakeRedis(), None):
        index = PrefixIndex(block_size=BS)
        mirror = None if client is None else RedisMirror(client=client, namespace="n")
        ctx = zmq.Context()
        ingest = EventIngest(index=index, poller=zmq.Poller(), ctx=ctx, mirror=mirror)
        stream = TargetStream(T, 1, SimpleNamespace(replay_in_flight=False))
        try:
            for seq, events in enumerate(batches):
                ingest._on_item(stream, AppliedBatch(seq, KVEventBatch(float(seq), events, 0)))
        finally:
            ctx.term()
        counts.append((stream.stored_blocks, stream.removed_blocks, index.snapshot(T)))
    assert counts[0] == counts[1]
