"""bench.sse_client against a loopback asyncio server speaking raw HTTP/1.1."""

from __future__ import annotations

import asyncio
import json

import pytest

from bench.sse_client import HTTPStreamError, post_sse


async def _serve(response: bytes):
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
        seen.append(head + await reader.readexactly(length))
        writer.write(response)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


def _collect(response: bytes) -> tuple[list[bytes], bytes]:
    async def main():
        server, port, seen = await _serve(response)
        async with server:
            events = [e async for e in post_sse(f"http://127.0.0.1:{port}/v1/completions", {"prompt": "hi"})]
        return events, seen[0]

    return asyncio.run(main())


def test_chunked_events_split_across_chunk_boundaries():
    body = b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    # Chunks cut mid-line, one with a chunk extension, as a proxy may forward them.
    pieces = [body[:7], body[7:20], body[20:]]
    chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) if i == 1 else b"%x\r\n%s\r\n" % (len(p), p)
                       for i, p in enumerate(pieces)) + b"0\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    events, request = _collect(response)
    assert events == [b'{"a": 1}', b'{"b": 2}', b"[DONE]"]
    assert request.startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert b"Connection: close\r\n" in request
    assert json.loads(request.split(b"\r\n\r\n", 1)[1]) == {"prompt": "hi"}


def test_content_length_and_close_delimited_bodies():
    body = b"data: 1\n\ndata: 2"  # no trailing newline: the last event is still delivered
    with_length = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    assert _collect(with_length)[0] == [b"1", b"2"]
    until_close = b"HTTP/1.1 200 OK\r\n\r\n" + body
    assert _collect(until_close)[0] == [b"1", b"2"]


def test_error_status_raises_with_the_body():
    response = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 12\r\n\r\nno workers\r\n"
    with pytest.raises(HTTPStreamError) as info:
        _collect(response)
    assert info.value.status == 503
    assert "no workers" in str(info.value)


@pytest.mark.parametrize("response", [
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort",
])
def test_malformed_responses_raise_one_error_type(response):
    with pytest.raises(HTTPStreamError):
        _collect(response)


def test_only_http_urls():
    async def main():
        return [e async for e in post_sse("https://example.invalid/x", {})]

    with pytest.raises(HTTPStreamError):
        asyncio.run(main())
