"""A minimal asyncio HTTP/1.1 client for streaming ``POST`` requests (Server-Sent Events).

The peer benchmark drives hundreds of concurrent streaming completions through kvr's HTTP
front and through peer routers; it needs the wall time of each request's first SSE event and
the events' payloads, nothing more. The standard library's ``http.client`` is blocking, and a
thread per request would put the benchmark's own scheduling into the TTFT it measures, so this
speaks HTTP/1.1 over ``asyncio.open_connection`` directly:

* one connection per request (``Connection: close``), as the benchmark wants (see
  ``bench/peer.py``: a keep-alive pool changes what some routers do);
* the body arrives either ``Transfer-Encoding: chunked`` (axum, aiohttp servers) or delimited by
  ``Content-Length`` / end of stream; both are decoded;
* events are yielded per ``data:`` line, as bytes without the ``data:`` prefix.

Errors: anything that goes wrong on the wire raises :class:`HTTPStreamError` (a malformed
status line or chunk header included); a non-200 status raises it with the status and the first
bytes of the body.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

#: Longest header block accepted; a server that sends more is not one the benchmark talks to.
MAX_HEADER_BYTES = 64 * 1024


class HTTPStreamError(Exception):
    """The request failed: ``status`` is the HTTP status (0 when no valid response arrived)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


async def _read_headers(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    parts = status_line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HTTPStreamError(0, f"malformed status line {status_line[:80]!r}")
    headers: dict[str, str] = {}
    total = len(status_line)
    while True:
        line = await reader.readline()
        total += len(line)
        if total > MAX_HEADER_BYTES:
            raise HTTPStreamError(0, "response headers too large")
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _body_chunks(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The decoded body, in pieces as they arrive."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readline()
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise HTTPStreamError(0, f"malformed chunk header {size_line[:40]!r}") from None
            if size == 0:
                return  # trailers, if any, are not read: the connection closes anyway
            try:
                data = await reader.readexactly(size)
                await reader.readexactly(2)  # the CRLF after each chunk
            except asyncio.IncompleteReadError:
                raise HTTPStreamError(0, "connection closed inside a chunk") from None
            yield data
    elif "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining > 0:
            data = await reader.read(min(remaining, 65536))
            if not data:
                raise HTTPStreamError(0, "connection closed before the body ended")
            remaining -= len(data)
            yield data
    else:
        while data := await reader.read(65536):
            yield data


async def post_sse(url: str, body: dict) -> AsyncIterator[bytes]:
    """``POST`` ``body`` as JSON to ``url``; yield each SSE ``data:`` payload as it arrives.

    The caller bounds the whole exchange (``asyncio.timeout``); closing the generator closes
    the connection.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise HTTPStreamError(0, f"only http:// URLs are supported, not {url!r}")
    port = parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(parts.hostname, port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        status, headers = await _read_headers(reader)
        if status != 200:
            text = b"".join([c async for c in _body_chunks(reader, headers)])[:200]
            raise HTTPStreamError(status, text.decode("utf-8", "replace"))
        pending = b""
        async for chunk in _body_chunks(reader, headers):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.startswith(b"data:"):
                    yield line[5:].strip()
        if pending.startswith(b"data:"):
            yield pending[5:].strip()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
