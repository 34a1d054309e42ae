"""The front's idle timeout: a request the router stops answering ends with ``timeout`` (504 before
its stream opened, an SSE error event after), and one whose replies keep coming is never cut, however
long it runs (the deadline moves on with each reply)."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time

import pytest
import zmq

from bus.codec import client_decoder, encode
from bus.schema import Completion, GenerateRequest, Routed, TokenChunk
from router.http_front import RouterHttpFront, _finish

pytestmark = pytest.mark.timeout(60)


BURST_TOKENS = 300


class ScriptedRouter(threading.Thread):
    """A ROUTER socket that answers each request as its prompt says: ``silent`` (nothing),
    ``routed`` (a Routed, then nothing), ``slow`` (a token every 0.3 s for 2.4 s, then the end),
    ``burst`` (``BURST_TOKENS`` 16 kB tokens at once, then the end)."""

    def __init__(self, ctx: zmq.Context) -> None:
        super().__init__(daemon=True)
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.halt = threading.Event()

    def run(self) -> None:
        decoder = client_decoder()
        slow: dict[str, tuple[bytes, int, float]] = {}  # request id -> (client, tokens sent, next at)
        while not self.halt.is_set():
            if self.sock.poll(20):
                ident, data = self.sock.recv_multipart()
                msg = decoder.decode(data)
                if isinstance(msg, GenerateRequest) and msg.prompt in ("routed", "slow", "burst"):
                    self.sock.send_multipart([ident, encode(Routed(msg.request_id, "w0", 0, 0, 0, "kvr"))])
                    if msg.prompt == "slow":
                        slow[msg.request_id] = (ident, 0, time.monotonic() + 0.3)
                    if msg.prompt == "burst":  # BURST_TOKENS big tokens at once: far more than a socket buffers
                        for seq in range(BURST_TOKENS):
                            text = f"<{seq}>" + "x" * 16000
                            self.sock.send_multipart([ident, encode(TokenChunk(msg.request_id, [5], text, seq=seq))])
                        self.sock.send_multipart([ident, encode(Completion(msg.request_id, "length", 0, BURST_TOKENS,
                                                                           0, "w0", chunks=BURST_TOKENS))])
            now = time.monotonic()
            for rid, (ident, sent, at) in list(slow.items()):
                if now < at:
                    continue
                if sent == 8:
                    self.sock.send_multipart([ident, encode(Completion(rid, "length", 0, 8, 0, "w0", chunks=8))])
                    del slow[rid]
                else:
                    self.sock.send_multipart([ident, encode(TokenChunk(rid, [5], " a", seq=sent))])
                    slow[rid] = (ident, sent + 1, now + 0.3)
        self.sock.close(linger=0)


@pytest.fixture
def front():
    ctx = zmq.Context()
    router = ScriptedRouter(ctx)
    router.start()
    front = RouterHttpFront(client_endpoint=f"tcp://127.0.0.1:{router.port}", ctx=ctx, request_timeout_s=1.2,
                            stats=lambda: {"workers": 1})
    front.start()
    yield front
    front.close()
    router.halt.set()
    router.join(timeout=5)
    ctx.term()


def _post(front: RouterHttpFront, prompt: str, stream: bool) -> tuple[int, bytes, float]:
    host, port = front.server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=20)
    t0 = time.monotonic()
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": prompt, "max_tokens": 8, "stream": stream}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data, time.monotonic() - t0


def test_no_reply_at_all_is_a_504_after_the_idle_timeout(front) -> None:
    status, body, took_s = _post(front, "silent", stream=False)
    assert status == 504 and json.loads(body)["error"]["type"] == "timeout"
    assert 0.2 <= took_s < 5.0  # the 1.2 s timeout, pushed on at most once a second


def test_a_stream_that_goes_quiet_ends_with_a_timeout_event(front) -> None:
    status, body, _ = _post(front, "routed", stream=True)
    events = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "timeout"


def test_replies_that_keep_coming_are_never_cut_by_the_idle_timeout(front) -> None:
    status, body, took_s = _post(front, "slow", stream=True)
    events = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
    assert status == 200 and took_s > 1.2 * 1.5  # longer than the timeout, in all
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1] if "choices" in json.loads(e)]
    assert "".join(texts) == " a" * 8 and events[-1] == "[DONE]"
    assert not any("error" in json.loads(e) for e in events[:-1])


def test_a_client_that_reads_late_gets_a_burst_whole_and_in_order(front) -> None:
    """4.8 MB of tokens at once to a client that does not read for a while: the front's writes wait
    for the socket to drain (``_Exchange.write_token`` hands a waiting write to a task and queues the
    rest behind it); every token arrives once, in order."""
    host, port = front.server.server_address[:2]
    body = json.dumps({"prompt": "burst", "max_tokens": 8, "stream": True}).encode()
    with socket.create_connection((host, port), timeout=20) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        sock.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(1.0)  # not reading: the front's socket buffer fills up
        data = b"".join(iter(lambda: sock.recv(1 << 16), b""))
    events = [line[6:] for line in data.decode().split("\n") if line.startswith("data: ")]
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert [t[:t.index(">") + 1] for t in texts if t] == [f"<{i}>" for i in range(BURST_TOKENS)]
    assert events[-1] == "[DONE]"


def test_a_write_that_waited_for_the_socket_is_finished_in_order_and_its_failure_kept() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        log: list[str] = []

        async def write(drained: asyncio.Future) -> None:
            log.append("written")
            await drained
            log.append("drained")

        drained = loop.create_future()
        coro = write(drained)
        waiting = coro.send(None)  # how write_token starts a write: it stops at the drain
        task = asyncio.ensure_future(_finish(coro, waiting))
        await asyncio.sleep(0.01)
        assert log == ["written"] and not task.done()
        drained.set_result(None)
        await task
        broken = loop.create_future()
        coro = write(broken)
        task = asyncio.ensure_future(_finish(coro, coro.send(None)))
        broken.set_exception(ConnectionResetError("gone"))
        with pytest.raises(ConnectionResetError):
            await task
        return log

    assert asyncio.run(main()) == ["written", "drained", "written"]
