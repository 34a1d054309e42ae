"""Router replicas' in-flight figures in RouterCore's load (router/peers.py carries them)."""

from __future__ import annotations

from core.policies import get_policy
from core.prefix_index import PrefixIndex, WorkerKey
from core.routing import PeerTargetLoad, RouterCore, RoutingInput

BS = 16
A, B = WorkerKey("a", 0), WorkerKey("b", 0)


def _core() -> RouterCore:
    core = RouterCore(policy=get_policy("kvr", block_size=BS), index=PrefixIndex(block_size=BS), block_size=BS)
    core.register(A, capacity_blocks=1000)
    core.register(B, capacity_blocks=1000)
    return core


def test_own_load_lists_every_target_with_what_this_router_has_in_flight() -> None:
    core = _core()
    assert core.own_load() == {A: PeerTargetLoad(), B: PeerTargetLoad()}
    res = core.route(RoutingInput("r1", list(range(5 * BS)), 4, None, None, "a"), now=0.0)
    own = core.own_load()
    assert own[B] == PeerTargetLoad()
    assert (own[A].in_flight, own[A].pending_prefill_tokens, own[A].active_blocks) == (1, 5 * BS, 5)
    assert own[A].decode_blocks == res.in_flight.decode_blocks
    core.on_finish("r1")
    assert core.own_load()[A] == PeerTargetLoad()


def test_peer_figures_add_to_the_load_replace_each_other_and_are_forgotten() -> None:
    core = _core()
    core.route(RoutingInput("mine", list(range(2 * BS)), 4, None, None, "a"), now=0.0)
    core.set_peer_load("r2", {A: PeerTargetLoad(3, 500, 7, 9)})
    load = core.load(A)
    assert (load.in_flight, load.queued_prefill_tokens, load.decode_blocks) == (4, 2 * BS + 500, 1 + 7)
    assert load.active_blocks == 2 + 9
    core.set_peer_load("r3", {A: PeerTargetLoad(1, 0, 0, 0), B: PeerTargetLoad(2, 10, 0, 0)})
    assert (core.load(A).in_flight, core.load(B).in_flight) == (5, 2)
    core.set_peer_load("r2", {A: PeerTargetLoad(1, 0, 0, 0)})  # replaces r2's figures, not added to them
    assert core.load(A).in_flight == 1 + 1 + 1
    core.forget_peer("r3")
    assert (core.load(A).in_flight, core.load(B).in_flight) == (2, 0)
    core.set_peer_load("ghost", {WorkerKey("unknown", 0): PeerTargetLoad(9, 9, 9, 9)})  # not ours: ignored
    assert core.load(A).in_flight == 2


def test_a_busy_peer_steers_the_decision_away() -> None:
    """Same overlap (none) everywhere: the target a replica has loaded is the one not chosen."""
    core = _core()
    core.set_peer_load("r2", {A: PeerTargetLoad(8, 20_000, 40, 100)})
    res = core.route(RoutingInput("x", list(range(4 * BS)), 4, None, None), now=0.0)
    assert res.decision.target == B
    core.forget_peer("r2")
    core.set_peer_load("r2", {B: PeerTargetLoad(8, 20_000, 40, 100)})
    res = core.route(RoutingInput("y", list(range(1000, 1000 + 4 * BS)), 4, None, None), now=0.0)
    assert res.decision.target == A


def test_routes_shared_with_replicas_are_the_blocks_the_target_did_not_hold() -> None:
    core = _core()
    assert core.take_shared_routes() == []  # not sharing: nothing kept
    core.route(RoutingInput("r0", list(range(4 * BS)), 4, None, None, "a"), now=0.0)
    assert core.take_shared_routes() == []
    core.share_routes()
    first = core.route(RoutingInput("r1", list(range(6 * BS)), 4, None, None, "a"), now=0.0)
    # r0 predicted the first 4 blocks on "a": only blocks 4 and 5 are new there.
    assert core.take_shared_routes() == [(A, first.block_hashes[4:])]
    assert core.take_shared_routes() == []  # each prediction is handed over once
    core.route(RoutingInput("r2", list(range(6 * BS)), 4, None, None, "a"), now=0.0)
    assert core.take_shared_routes() == []  # all predicted already: nothing new to share


def test_a_peers_route_is_predicted_here_and_steers_the_next_request() -> None:
    sender, receiver = _core(), _core()
    sender.share_routes()
    prompt = list(range(1000, 1000 + 8 * BS))
    sender.route(RoutingInput("s1", prompt, 4, None, None, "b"), now=0.0)
    ((target, hashes),) = sender.take_shared_routes()
    assert target == B and len(hashes) == 8
    assert receiver.predict_from_peer(B, hashes, now=1.0)
    assert not receiver.predict_from_peer(WorkerKey("unknown", 0), hashes, now=1.0)
    # The receiver's index now predicts the prefix on B for its tentative window: a sibling request
    # (same prefix, new tail) goes to B, with the peer's blocks as its overlap.
    res = receiver.route(RoutingInput("r1", prompt + list(range(5000, 5000 + 2 * BS)), 4), now=1.5)
    assert res.decision.target == B and res.decision.overlap_blocks == 8
    late = _core()
    late.predict_from_peer(B, hashes, now=0.0)
    late.expire(now=late.tentative_window_s + 0.1)  # past the window: forgotten like its own predictions
    assert late.index.overlap(hashes, now=late.tentative_window_s + 0.1) == {}
