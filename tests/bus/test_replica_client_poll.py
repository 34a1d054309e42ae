"""``ReplicaClient.poll`` reads every replica as soon as any is readable, never waiting on one."""

from __future__ import annotations

import msgspec
import zmq

from bus.codec import encode
from bus.replica_client import ReplicaClient
from bus.schema import Completion, GenerateRequest


def _router(ctx: zmq.Context) -> tuple[zmq.Socket, str]:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    return sock, f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"


def test_a_reply_on_one_replica_is_read_without_waiting_on_the_silent_other() -> None:
    ctx = zmq.Context()
    silent, silent_ep = _router(ctx)
    answering, answering_ep = _router(ctx)
    client = ReplicaClient(endpoints=[silent_ep, answering_ep])
    timeouts: list[int] = []
    for replica in client._clients:  # record how long each replica is polled for
        original = replica.poll
        replica.poll = lambda timeout_ms=100, _poll=original: (timeouts.append(timeout_ms), _poll(timeout_ms))[1]
    try:
        first = client.send(GenerateRequest(request_id="a", token_ids=[1], max_tokens=1))
        second = client.send(GenerateRequest(request_id="b", token_ids=[1], max_tokens=1))
        assert {client._owner["a"].endpoint, client._owner["b"].endpoint} == {silent_ep, answering_ep}
        rid = "a" if client._owner["a"].endpoint == answering_ep else "b"
        assert answering.poll(5000) and silent.poll(5000)
        identity, frame = answering.recv_multipart()
        while msgspec.msgpack.decode(frame).get("request_id") != rid:  # (the first frame may be another's)
            identity, frame = answering.recv_multipart()
        answering.send_multipart([identity, encode(Completion(request_id=rid, worker_id="w", prompt_tokens=1,
                                                              cached_tokens=0, output_tokens=1,
                                                              finish_reason="length"))])
        done = []
        for _ in range(100):  # each poll returns at its deadline or at the first reply
            done = client.poll(timeout_ms=100)
            if done:
                break
        assert [r.request_id for r in done] == [rid] and done[0].completion is not None
        assert (first if rid == "a" else second).done
        assert timeouts and set(timeouts) == {0}  # no replica is ever waited on alone
    finally:
        client.close()
        ctx.destroy(linger=0)
