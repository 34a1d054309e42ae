"""A streaming handler whose client left finds out by a write failing: the request ends as a
cancelled one (no ERROR log line with a traceback: issue 13, "BrokenPipe tracebacks")."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time

import pytest
from aiohttp import web

from bus.http_server import HttpServer
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(30)


def test_a_write_to_a_client_that_left_ends_the_handler_without_a_traceback(caplog) -> None:
    ended: list[str] = []
    streaming, gone = threading.Event(), threading.Event()

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=200)
        await resp.prepare(request)
        streaming.set()
        # Blocks the loop while the client resets the connection, so the handler is not cancelled
        # first: it finds out by writing (as the router's front does, relaying a burst of chunks).
        assert gone.wait(5)
        time.sleep(0.2)
        try:
            for _ in range(3):
                await resp.write(b"data: x\n\n")
        except BaseException as exc:
            ended.append(type(exc).__name__)
            raise
        ended.append("finished")
        return resp

    caplog.set_level(logging.DEBUG)
    server = HttpServer(handle=handle, host="127.0.0.1", port=0, name="t")
    server.start()
    try:
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            assert streaming.wait(5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        gone.set()  # closed: reset
        eventually(lambda: ended, what="the stream ended")
    finally:
        server.close()
    assert ended and ended[0] != "finished"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
