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
