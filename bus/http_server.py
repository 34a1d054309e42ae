"""An aiohttp HTTP/1.1 server on its own event-loop thread: the transport of kvr's HTTP edges.

Both HTTP edges (the router's front, the emulated worker's vLLM face) serve through this. What it
guarantees, whatever the handler does:

* the listening socket is bound in the constructor (a taken port is an ``OSError`` there) with a
  real listen backlog (:data:`LISTEN_BACKLOG`; the kernel caps it at ``net.core.somaxconn``);
* at most ``max_in_flight`` requests other than GETs are handled at once (:class:`Admission`): one
  more is answered 429 with ``Retry-After`` at once, never left in a queue without an answer
  (GETs are health probes, metrics and model lists: cheap, and a probe must pass under load);
* an idle keep-alive connection is closed after ``keepalive_timeout_s``;
* malformed HTTP (ambiguous framing such as ``Content-Length`` with ``Transfer-Encoding``, a bad
  ``Content-Length``, an oversized header) is answered 400 with the OpenAI error JSON and the
  connection closed, and logged at debug level without a traceback;
* a handler whose client disconnects is cancelled (``handler_cancellation``): it sees
  ``CancelledError`` where it waits, and can abort its work there; one that finds out by a write
  failing (``ConnectionError``) ends the same way, without a traceback in the log;
* an exception a handler lets out is one 500 with the error JSON and one log line with its traceback.

Streams: aiohttp frames a response without a length as chunked for HTTP/1.1 clients and by closing
the connection for HTTP/1.0 ones, so a handler never chooses the framing itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from bus.openai_http import MAX_BODY_BYTES, HttpError, error_body, retry_headers

logger = logging.getLogger(__name__)

#: Connections the kernel queues before aiohttp accepts them (a burst of thousands must not be reset).
LISTEN_BACKLOG = 4096
#: vLLM (uvicorn) closes an idle keep-alive connection after 5 s as well.
KEEPALIVE_TIMEOUT_S = 5.0
#: How long closing waits for requests still answering before it drops their connections.
SHUTDOWN_TIMEOUT_S = 2.0
#: How long an answered connection with a body still coming is drained before it closes: long enough
#: for a client to read the answer (closing on unread data would reset it), short for one that stalls.
LINGERING_S = 1.0
#: Requests handled at once before the next is answered 429.
MAX_IN_FLIGHT = 4096

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json",
                        headers=headers)


def error_response(exc: HttpError) -> web.Response:
    return json_response(exc.status, error_body(exc.status, str(exc), exc.kind),
                         {**retry_headers(exc.status), **exc.headers})


async def read_body(request: web.BaseRequest, *, limit_bytes: int = MAX_BODY_BYTES) -> bytes:
    """The whole body, or a 413 (a ``Content-Length`` over the limit is refused before reading)."""
    length = request.content_length
    if length is not None and length > limit_bytes:
        raise HttpError(413, f"request body of {length} bytes is over the {limit_bytes}-byte limit",
                        "prompt_too_long")
    parts, size = [], 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit_bytes:  # a chunked body has no length up front
            raise HttpError(413, f"request body is over the {limit_bytes}-byte limit", "prompt_too_long")
        parts.append(chunk)
    return b"".join(parts)


class Admission:
    """At most ``max_in_flight`` requests at once; the next is refused (429), not queued."""

    def __init__(self, *, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.refused = 0

    def enter(self) -> None:
        if self.in_flight >= self.max_in_flight:
            self.refused += 1
            raise HttpError(429, f"over {self.max_in_flight} requests in flight, try again shortly", "overloaded")
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1


class _JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering malformed HTTP with the error JSON (not text/plain)
    and without a traceback in the log (a client's mistake is not the server's error)."""

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status == 500:
            return super().handle_error(request, status, exc, message)
        reason = str(message or exc).splitlines()[0].rstrip(": ")  # the parser's first line, without its caret drawing
        logger.debug("malformed HTTP request from %s: %s", request.remote, reason)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent")
        resp = json_response(status, error_body(status, f"malformed HTTP request: {reason}", "bad_request"))
        resp.force_close()
        return resp


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class HttpServer:
    """Serve ``handle`` on ``host:port``; :meth:`start` runs the loop in a daemon thread.

    ``on_start`` runs on the loop before serving; ``on_stop`` when closing, before the connections
    are shut (the router front closes its ZMQ socket there and answers what still waits on it).
    ``loop`` is the server's event loop, for ``call_soon_threadsafe`` from other threads.
    """

    def __init__(self, *, handle: Handler, host: str = "127.0.0.1", port: int = 0, name: str = "kvr-http",
                 keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S, backlog: int = LISTEN_BACKLOG,
                 max_in_flight: int = MAX_IN_FLIGHT,
                 on_start: Callable[[], Awaitable[None]] | None = None,
                 on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
        self._handle, self._name = handle, name
        self.admission = Admission(max_in_flight=max_in_flight)
        self._keepalive_timeout_s = keepalive_timeout_s
        self._on_start, self._on_stop = on_start, on_stop
        self._sock = socket.create_server((host, port), backlog=backlog)
        self._backlog = backlog
        self.server_address: tuple[str, int] = self._sock.getsockname()[:2]
        self.loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        runner = None
        try:
            if self._on_start is not None:
                await self._on_start()
            server = _Server(self._guarded, handler_cancellation=True, keepalive_timeout=self._keepalive_timeout_s,
                             lingering_time=LINGERING_S, access_log=None)
            runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
            await runner.setup()
            await web.SockSite(runner, self._sock, backlog=self._backlog).start()
        except BaseException as exc:  # handed to start()
            self._error = exc
            self._started.set()
            if runner is not None:
                await runner.cleanup()
            return
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            if self._on_stop is not None:
                await self._on_stop()  # first: requests waiting on it get their answer (503) and end
            await runner.cleanup()

    async def _guarded(self, request: web.BaseRequest) -> web.StreamResponse:
        admitted = request.method != "GET"  # GETs (health, metrics, models) are cheap: probes must pass
        try:
            if admitted:
                self.admission.enter()
        except HttpError as exc:
            return error_response(exc)
        try:
            return await self._handle(request)
        except HttpError as exc:
            resp = error_response(exc)
            if not request.content.at_eof():
                resp.force_close()  # the unread body (over the limit) must not be read as the next request
            return resp
        except asyncio.CancelledError:
            raise  # the client left while the handler waited: nobody to answer
        except ConnectionError as exc:
            # The client left while the handler wrote to it. Let out as is, aiohttp would log it with
            # a traceback at ERROR ("Error handling request"); ended as a cancellation, it is what a
            # client that leaves mid-wait already is: one debug line, the connection closed.
            logger.debug("%s %s: the client left (%s)", request.method, request.path, exc)
            raise asyncio.CancelledError from exc
        except Exception:  # a bug must not drop the connection without an answer
            logger.exception("%s %s failed", request.method, request.path)
            resp = error_response(HttpError(500, "internal error", "internal"))
            resp.force_close()
            return resp
        finally:
            if admitted:
                self.admission.leave()

    @property
    def serving(self) -> bool:
        """The server's thread is running (False before ``start`` and once it ended, even by a crash)."""
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive() and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        elif self._thread is None:
            self.loop.close()
        self._sock.close()
