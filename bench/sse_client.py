"""Streaming ``POST`` requests (Server-Sent Events) for the benchmarks, on aiohttp's client.

The peer benchmark drives hundreds of concurrent streaming completions through kvr's HTTP
front and through peer routers; it needs the wall time of each request's first SSE event and
the events' payloads, nothing more. A blocking client would need a thread per request and put
the benchmark's own scheduling into the TTFT it measures, so this is asyncio (aiohttp):

* one connection per request (``Connection: close``), as the benchmark wants (see
  ``bench/peer.py``: a keep-alive pool changes what some routers do);
* the body may be chunked, ``Content-Length``-delimited or close-delimited: aiohttp decodes all;
* events are yielded per ``data:`` line, as bytes without the ``data:`` prefix.

Errors: anything that goes wrong on the wire raises :class:`HTTPStreamError` (a malformed
status line or chunk included); a non-200 status raises it with the status and the first
bytes of the body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp


class HTTPStreamError(Exception):
    """The request failed: ``status`` is the HTTP status (0 when no valid response arrived)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


async def post_sse(url: str, body: dict) -> AsyncIterator[bytes]:
    """``POST`` ``body`` as JSON to ``url``; yield each SSE ``data:`` payload as it arrives.

    The caller bounds the whole exchange (``asyncio.timeout``); closing the generator closes
    the connection.
    """
    if urlsplit(url).scheme != "http":
        raise HTTPStreamError(0, f"only http:// URLs are supported, not {url!r}")
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
            async with session.post(url, json=body, headers={"Accept": "text/event-stream"}) as resp:
                if resp.status != 200:
                    text = (await resp.content.read(200)).decode("utf-8", "replace")
                    raise HTTPStreamError(resp.status, text)
                async for line in resp.content:  # one line per item, the last one even without "\n"
                    if line.startswith(b"data:"):
                        yield line[5:].strip()
    except aiohttp.ClientError as exc:  # refused, reset, malformed status line or chunk, cut short
        raise HTTPStreamError(0, f"{type(exc).__name__}: {exc}") from None
