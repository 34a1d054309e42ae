"""CURVE: an authorised client talks to the server; an unknown key gets nothing through."""

from __future__ import annotations

import shutil

import zmq
from click.testing import CliRunner

from bus.security import Authenticator, generate_keys, load_key_pair, load_public_key, make_client, make_server
from cli.main import main


def test_kvr_keys_writes_key_pairs(tmp_path) -> None:
    result = CliRunner().invoke(main, ["keys", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        "client.key", "client.key_secret", "clients", "router.key", "router.key_secret", "worker.key",
        "worker.key_secret", "workers"]
    # The router's authorised sets hold only public keys, one per role.
    assert [p.name for p in (tmp_path / "k" / "workers").iterdir()] == ["worker.key"]
    assert [p.name for p in (tmp_path / "k" / "clients").iterdir()] == ["client.key"]
    result = CliRunner().invoke(main, ["keys", str(tmp_path / "k"), "--name", "gpu7", "--role", "worker"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "k" / "workers").iterdir()) == ["gpu7.key", "worker.key"]
    result = CliRunner().invoke(main, ["keys", str(tmp_path / "k"), "--name", "gpu8"])
    assert result.exit_code != 0 and "--role" in result.output


def test_only_authorised_clients_get_through(tmp_path) -> None:
    keys_dir, authorised, stranger_dir = tmp_path / "keys", tmp_path / "authorised", tmp_path / "stranger"
    generate_keys(keys_dir, ("router", "client"))
    generate_keys(stranger_dir, ("client",))
    authorised.mkdir()
    shutil.copy(keys_dir / "client.key", authorised / "client.key")

    ctx = zmq.Context()
    with Authenticator(ctx=ctx, directory=authorised):
        server = ctx.socket(zmq.ROUTER)
        server.setsockopt(zmq.LINGER, 0)
        make_server(server, load_key_pair(keys_dir, "router"))
        port = server.bind_to_random_port("tcp://127.0.0.1")
        router_public = load_public_key(keys_dir, "router")

        def client(folder):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            make_client(sock, load_key_pair(folder, "client"), router_public)
            sock.connect(f"tcp://127.0.0.1:{port}")
            return sock

        good, bad = client(keys_dir), client(stranger_dir)
        bad.send(b"from stranger")
        good.send(b"from client")
        assert server.poll(5000)
        identity, payload = server.recv_multipart()
        assert payload == b"from client"
        # The stranger's message never arrives.
        assert server.poll(500) == 0
        for sock in (good, bad, server):
            sock.close()
    ctx.term()


def test_a_curve_publisher_streams_only_to_the_router_key(tmp_path) -> None:
    """KV events carry token ids (prompt content): only the router's key may read them."""
    import time

    from bus.publisher import EventPublisher
    from bus.security import load_curve
    from bus.subscriber import AppliedBatch, EventSubscriber
    from core.events import BlockStored

    generate_keys(tmp_path / "k")
    generate_keys(tmp_path / "s", ("client",))
    (tmp_path / "s" / "router.key").write_bytes((tmp_path / "k" / "router.key").read_bytes())
    worker = load_curve(tmp_path / "k", name="worker")
    ctx = zmq.Context()
    pub = EventPublisher(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", bind=True, ctx=ctx,
                         curve=worker)
    readers = {
        "router": EventSubscriber(endpoint=pub.endpoint, replay_endpoint=pub.replay_endpoint, ctx=ctx,
                                  curve=load_curve(tmp_path / "k", name="router"), server_key=worker.public_z85),
        "stranger": EventSubscriber(endpoint=pub.endpoint, replay_endpoint=pub.replay_endpoint, ctx=ctx,
                                    curve=load_curve(tmp_path / "s", name="client"), server_key=worker.public_z85),
        "plain": EventSubscriber(endpoint=pub.endpoint, replay_endpoint=pub.replay_endpoint, ctx=ctx),
    }
    got = {name: 0 for name in readers}
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        pub.publish([BlockStored([1], None, list(range(16)), 16, None, "GPU", None)], time.time())
        pub.poll_replay(0)
        for name, sub in readers.items():
            got[name] += sum(isinstance(i, AppliedBatch) for i in sub.poll(10))
    assert got["router"] > 0
    assert got["stranger"] == 0 and got["plain"] == 0
    for sub in readers.values():
        sub.close()
    pub.close()
    ctx.term()
