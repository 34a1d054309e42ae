"""The router's OpenAI-compatible HTTP front: one more client of the router's client channel.

Served (aiohttp, through ``bus/http_server.py``; bodies, errors and SSE per ``bus/openai_http.py``):

* ``POST /v1/completions`` and ``/v1/chat/completions``: streaming (SSE) or not; a prompt is a
  string or a list of token ids; ``usage.prompt_tokens_details.cached_tokens`` is the engine's prefix
  hit; a ``kvr`` object (and ``x-kvr-worker`` header) says where it ran and what the router predicted;
* ``GET /v1/models``: the model names the registered workers serve (their ``Hello``; the same
  names an unknown model's error lists), then the front's alias if it has one (``--model-name``:
  accepted for any served model);
* ``GET /health`` (200 while a worker is registered, else 503; the body names the workers and the
  Redis mirror's health: ``mirror: degraded (out_of_memory since ...)`` stays 200, since routing
  never depends on Redis and a load balancer must not pull a router that routes), ``/metrics``
  (Prometheus text: router counters, per-target index and load gauges, ``kvr_router_mirror_degraded``).

A known path asked with another method is answered 405 with an ``Allow`` header (404: unknown path).

One asyncio loop (the HTTP server's thread) serves every connection and either turns an in-process
router (``kvr router``) or owns one DEALER per router's client ROUTER (``kvr front`` over router
replicas: requests spread over them and fail over before their first token, ``router/front_links.py``),
read from the loop's own epoll; replies are handed to each request's queue by request id, and a
request writes every reply waiting in its queue as one write.
Errors map to HTTP statuses (``STATUS_FOR_CODE``: bad request 400, prompt too long or body over
64 MiB 413, unknown model 404, overloaded 429, no workers 503, timeout 504...; 429 and 503 with
``Retry-After``) with OpenAI-style JSON whose ``type`` is the stable ``ErrorCode`` value.

Invariants:
* a request the router has not ended (no ``Completion``/``ErrorReply`` yet) whose HTTP exchange
  ends anyway (the client left, the front timed out, the stream could not go on) is cancelled at
  the router with ``CancelRequest``;
* one HTTP response per request: a second ``Routed`` (the router re-routed it before any token)
  continues the same response; one after tokens were sent ends the stream with an SSE error event
  (the new worker would repeat them).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, cast

import msgspec
import zmq
from aiohttp import web

from bus.codec import encode
from bus.http_server import KEEPALIVE_TIMEOUT_S, MAX_IN_FLIGHT, HttpServer, json_response, read_body
from bus.mirror_status import describe as describe_mirror
from bus.openai_http import (
    SSE_CONTENT_TYPE,
    SSE_DONE,
    STATUS_FOR_CODE,
    CompletionBody,
    HttpError,
    bad_request,
    decode_json_body,
    no_route,
    sse_error,
    sse_event,
    usage_body,
)
from bus.openai_http import (
    parse_completion_body as parse_openai_body,
)
from bus.schema import CancelRequest, Completion, ErrorCode, ErrorReply, GenerateRequest, Routed, TokenChunk
from bus.security import Curve
from bus.sockets import MAX_REQUEST_BYTES
from router.front_links import RouterLinks
from router.loop_driver import LoopDriver
from router.prometheus import CONTENT_TYPE, render_metrics

if TYPE_CHECKING:
    from router.service import RouterService

logger = logging.getLogger(__name__)

_GET_PATHS = frozenset({"/health", "/v1/models", "/metrics"})
_POST_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


class RouterHttpFront:
    """Serve the OpenAI API in front of a router; ``start`` serves in a daemon thread."""

    def __init__(self, *, client_endpoint: str | None = None, client_endpoints: Sequence[str] | None = None,
                 service: RouterService | None = None, host: str = "127.0.0.1", port: int = 0, model: str | None = None,
                 stats: Callable[[], dict] | None = None, ctx: zmq.Context | None = None,
                 request_timeout_s: float = 600.0, curve: Curve | None = None,
                 max_request_bytes: int = MAX_REQUEST_BYTES, max_in_flight: int = MAX_IN_FLIGHT,
                 keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S) -> None:
        """Exactly one of ``client_endpoint`` (a router's client socket, dialled with a DEALER),
        ``client_endpoints`` (router replicas on one fleet: a DEALER to each, requests spread and
        failed over, ``router/front_links.py``) and ``service`` (a router in this process, whose
        loop then runs on this front's loop: ``router/loop_driver.py``; its owner must not call
        ``run``, and closes it after this front).
        ``model``: an alias accepted for any served model, listed after the served names.
        ``stats``: the router's snapshot (``RouterService.stats``); its ``models`` are the served names.
        Without it, a front over router sockets serves its own: /health is 200 while a router is
        connected, /metrics counts its failovers and lost router sessions.
        ``curve``: the DEALER dials the router's client port as a CURVE client (bus/security.py).
        ``max_request_bytes``: the router's limit; bigger requests are refused here (PROMPT_TOO_LONG).
        ``max_in_flight``: completions handled at once; the next is answered 429.
        ``keepalive_timeout_s``: an idle connection is closed after this long."""
        if sum(x is not None for x in (client_endpoint, client_endpoints, service)) != 1:
            raise ValueError("give exactly one of client_endpoint, client_endpoints and service")
        endpoints = [client_endpoint] if client_endpoint is not None else list(client_endpoints or ())
        self.model = model
        self._service = service
        self._local_id = b""
        self._driver: LoopDriver | None = None
        if service is not None and stats is None:
            stats = lambda: service.stats  # noqa: E731
        self._own_stats = stats is None  # a front over router sockets with no router's snapshot
        self.stats = stats or self._front_stats
        self.request_timeout_s = request_timeout_s
        self.created = int(time.time())
        self._ids = itertools.count(1)
        self._max_request_bytes = max_request_bytes
        self._own_ctx = ctx is None and service is None  # an in-process router needs no socket here
        self._ctx = (ctx or zmq.Context()) if service is None else None
        self._links: RouterLinks | None = None
        if service is None:
            try:
                self._links = RouterLinks(endpoints=endpoints, ctx=cast(zmq.Context, self._ctx),
                                          deliver=self._deliver, curve=curve)
            except ValueError:
                if self._own_ctx:
                    cast(zmq.Context, self._ctx).term()
                raise
        self._open_links: RouterLinks | None = None  # the links while serving (None: shutting down)
        self._inboxes: dict[str, asyncio.Queue] = {}  # request id → its replies (None: the front closes)
        # Request id → its exchange while its SSE stream is open: a token chunk is written at once
        # from the reply's callback (``_Exchange.write_token``), not handed to the handler's task.
        self._streaming: dict[str, _Exchange] = {}
        try:
            self.server = HttpServer(handle=self._handle, host=host, port=port, name="kvr-router-http",
                                     max_in_flight=max_in_flight, keepalive_timeout_s=keepalive_timeout_s,
                                     on_start=self._open, on_stop=self._shut)
        except OSError:
            if self._own_ctx:
                cast(zmq.Context, self._ctx).term()
            raise

    @property
    def url(self) -> str:
        return self.server.url

    def model_names(self) -> list[str]:
        """What ``/v1/models`` lists: the served names the workers registered, then the alias."""
        served = list(self.stats().get("models") or ())
        return served + ([self.model] if self.model and self.model not in served else [])

    def default_model(self) -> str:
        """The ``model`` of a response whose request named none: the one served model, else the alias."""
        served = list(self.stats().get("models") or ())
        return served[0] if len(served) == 1 else (self.model or "")

    def next_id(self, chat: bool) -> str:
        return f"{'chatcmpl' if chat else 'cmpl'}-{next(self._ids)}-{self.created}"

    def start(self) -> None:
        self.server.start()

    @property
    def serving(self) -> bool:
        return self.server.serving

    def close(self) -> None:
        self.server.close()
        if self._own_ctx:
            cast(zmq.Context, self._ctx).term()

    # ------------------------------------------------------------------ the router link (on the loop)

    async def _open(self) -> None:
        if self._service is not None:
            self._local_id = self._service.attach_local_client(self._deliver)
            self._driver = LoopDriver(service=self._service, loop=asyncio.get_running_loop())
            self._driver.start()
            return
        # Plain (not zmq.asyncio) sockets read from the loop's own epoll: a reader runs when its FD
        # signals and reads every waiting reply without a Future per message (zmq.asyncio's recv
        # cost ~3x the rest of a streamed chunk's relay). Used only on the loop's thread.
        links = cast(RouterLinks, self._links)
        links.open(asyncio.get_running_loop())
        self._open_links = links

    def _deliver(self, reply: object) -> None:
        """A reply from the in-process router or a router link (on this loop's thread)."""
        rid = reply.request_id  # type: ignore[attr-defined]  # every reply type has one
        if type(reply) is TokenChunk:
            exchange = self._streaming.get(rid)
            if exchange is not None and exchange.write_token(reply):
                return
        inbox = self._inboxes.pop(rid, None) if isinstance(reply, (Completion, ErrorReply)) else self._inboxes.get(rid)
        if inbox is not None:  # None: a request that ended here already (cancelled)
            inbox.put_nowait(reply)

    async def _shut(self) -> None:
        if self._driver is not None:
            self._driver.stop()
            cast("RouterService", self._service).detach_local_client(self._local_id)
            self._driver = None
        links, self._open_links = self._open_links, None
        for inbox in self._inboxes.values():
            inbox.put_nowait(None)
        self._inboxes.clear()
        self._streaming.clear()
        if links is not None:
            links.close()

    def _send(self, msg: GenerateRequest, data: bytes) -> None:
        """Hand a request to the router without waiting; ``data``: it encoded."""
        if self._service is not None:
            if self._driver is not None:  # None: shutting down
                self._service.submit_local(self._local_id, msg)
                self._driver.kick()  # the submission sent on the worker socket: look at every socket again
        elif self._open_links is not None:
            self._open_links.send(msg.request_id, data)

    def _cancel(self, rid: str) -> None:
        """End a request at its router (also from a cancelled handler): never waits."""
        if self._service is not None:
            if self._driver is not None:
                self._service.submit_local(self._local_id, CancelRequest(rid))
                self._driver.kick()
        elif self._open_links is not None:
            self._open_links.cancel(rid)

    def _front_stats(self) -> dict:
        """The snapshot of a front over router sockets given none: its links, not the fleet."""
        links = self._open_links or self._links
        if links is None:
            return {}
        return {"routers": links.snapshot(), "pending": len(self._inboxes),
                "counters": {"front_failovers": links.failovers,
                             "front_router_connection_losses": links.connection_losses,
                             "front_late_replies": links.late_replies}}

    # ------------------------------------------------------------------ HTTP

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if request.method == "GET":
            if path == "/health":
                if self._own_stats:
                    return self._links_health()
                stats = self.stats()
                workers = stats.get("workers", 0)
                text = f"{workers} worker(s)\n"
                if stats.get("mirror") is not None:
                    text += f"mirror: {describe_mirror(stats['mirror'])}\n"
                return web.Response(status=200 if workers else 503, text=text, content_type="text/plain")
            if path == "/v1/models":
                cards = [{"id": name, "object": "model", "created": self.created, "owned_by": "kvr"}
                         for name in self.model_names()]
                return json_response(200, {"object": "list", "data": cards})
            if path == "/metrics":
                return web.Response(body=render_metrics(self.stats()), headers={"Content-Type": CONTENT_TYPE})
        elif request.method == "POST" and path in _POST_PATHS:
            return await self._completions(request, chat=path == "/v1/chat/completions")
        raise no_route(request.method, path, get_paths=_GET_PATHS, post_paths=_POST_PATHS)

    def _links_health(self) -> web.Response:
        """200 while at least one router is connected (it knows of no workers: the routers do)."""
        routers = self._front_stats().get("routers", {})
        up = sum(r["connected"] for r in routers.values())
        lines = [f"{up} of {len(routers)} router(s) connected"]
        lines += [f"{ep}: {'connected' if r['connected'] else 'not connected'}, {r['pending']} pending"
                  for ep, r in routers.items()]
        return web.Response(status=200 if up else 503, text="\n".join(lines) + "\n", content_type="text/plain")

    async def _completions(self, request: web.BaseRequest, *, chat: bool) -> web.StreamResponse:
        rid = self.next_id(chat)
        body = decode_json_body(await read_body(request))
        parsed = parse_openai_body(body, chat=chat)
        req = generate_request(parsed, request_id=rid, alias=self.model)
        data = encode(req)
        if len(data) > self._max_request_bytes:
            # The router would cut this DEALER's connection (ZMQ_MAXMSGSIZE) and with it the replies
            # of every other HTTP request in flight on it: refuse this one here.
            raise HttpError(413, f"request of {len(data)} bytes is over the router's {self._max_request_bytes}-byte "
                                 "limit", ErrorCode.PROMPT_TOO_LONG.value)
        if self._open_links is None and self._driver is None:
            raise HttpError(503, "the HTTP front is shutting down", ErrorCode.ROUTER_RESTARTED.value)
        inbox: asyncio.Queue = asyncio.Queue()
        self._inboxes[rid] = inbox
        self._send(req, data)
        try:
            return await _Exchange(self, request, rid, chat, parsed, body).run(inbox)
        finally:
            self._streaming.pop(rid, None)
            if self._inboxes.pop(rid, None) is not None:  # not ended by the router: end it there
                self._cancel(rid)


class _Exchange:
    """One request's replies from the router, relayed as one HTTP response (JSON or SSE)."""

    def __init__(self, front: RouterHttpFront, request: web.BaseRequest, rid: str, chat: bool,
                 parsed: CompletionBody, body: dict) -> None:
        self.front, self.request, self.rid, self.chat, self.parsed = front, request, rid, chat, parsed
        self.head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": body.get("model") or front.default_model()}
        self.response: web.StreamResponse | None = None  # the SSE stream, once its 200 is sent
        self._out: list[bytes] = []  # SSE events not yet written (one write per batch of replies)
        self._token_event: tuple[bytes, bytes] | None = None  # a token chunk's event around its text
        self._routed: Routed | None = None  # the latest Routed (a retry before any token sends another)
        self._texts: list[str] = []  # the tokens' texts so far
        self._ended = False  # the last events are being written: nothing more goes out at once
        self._pending: asyncio.Future | None = None  # a write_token write waiting for the socket to drain
        self._inbox: asyncio.Queue | None = None
        self._window: asyncio.Timeout | None = None
        self._pushed = 0.0
        self._idle_s = self._push_s = 0.0

    async def run(self, inbox: asyncio.Queue) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        idle_s = self.front.request_timeout_s
        push_s = min(1.0, idle_s / 4)
        self._inbox, self._idle_s, self._push_s = inbox, idle_s, push_s
        # One timeout for the whole exchange, its deadline pushed on as replies arrive, at most every
        # ``push_s`` (a new timeout per reply cost a timer per streamed chunk): a request with no
        # reply for ``idle_s`` (less ``push_s`` at worst: 1 s, or a quarter of it) ends with TIMEOUT.
        # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that lands as the queue
        # yields an item (gh-86296), so a handler whose client left (aiohttp cancels it) relayed a
        # busy stream to its end and never cancelled the request at the router.
        try:
            async with asyncio.timeout(idle_s) as window:
                self._window, self._pushed = window, loop.time()
                while True:
                    batch = [await inbox.get()]
                    self._push_window(loop.time())
                    while not inbox.empty():  # whatever else arrived goes out in the same write
                        batch.append(inbox.get_nowait())
                    response = await self._relay(batch)
                    if response is not None:
                        return response
        except TimeoutError:
            if not window.expired():
                raise
        response = await self._relay([ErrorReply(self.rid, ErrorCode.TIMEOUT, "no reply from the router in time")])
        assert response is not None  # an ErrorReply always ends the exchange
        return response

    async def _relay(self, batch: list) -> web.StreamResponse | None:
        """Relay a batch of replies (one write); the response once the exchange ended, else None."""
        for msg in batch:
            if msg is None:
                msg = ErrorReply(self.rid, ErrorCode.ROUTER_RESTARTED, "the HTTP front is shutting down")
            if isinstance(msg, Routed):
                if self._routed is not None and self._texts:
                    # Re-routed after tokens: the new worker would start over. The router does not
                    # do this (it retries only before the first token); if it did, stop here.
                    msg = ErrorReply(self.rid, ErrorCode.WORKER_DIED,
                                     f"re-routed to {msg.worker_id} after tokens were sent")
                else:
                    first, self._routed = self._routed is None, msg
                    if first and self.parsed.stream:
                        await self._open_stream(msg)
                    continue  # a retry before any token: the same response goes on
            if isinstance(msg, TokenChunk):
                self._texts.append(msg.text)
                if self.response is not None:
                    self._out.append(self._token_sse(msg.text))
            elif isinstance(msg, ErrorReply):
                if self.response is None:
                    raise HttpError(STATUS_FOR_CODE.get(msg.code, 500), msg.message, msg.code.value)
                self._out.append(sse_error(msg.message, msg.code.value))
                return await self._end(self.response)
            elif isinstance(msg, Completion):
                return await self._complete(msg, self._routed, "".join(self._texts))
        await self._flush()
        if self.response is not None:  # headers and all before are out: tokens may go at once now
            self.front._streaming[self.rid] = self
        return None

    def write_token(self, msg: TokenChunk) -> bool:
        """Write a token's SSE event now, from the reply's callback (no wake-up of this exchange's
        task per token). False (nothing written) when it must take the queue instead, so order holds:
        the stream is ending, replies are queued ahead of it, an earlier write waits for the socket,
        the idle timeout fired, or the write fails (the task's own write then meets the failure)."""
        window, response = self._window, self.response
        if (self._ended or self._pending is not None or self._out or response is None or window is None
                or window.expired() or not cast(asyncio.Queue, self._inbox).empty()):
            return False
        try:
            write = response.write(self._token_sse(msg.text))
            try:
                waiting = write.send(None)
            except StopIteration:
                waiting = None
        except Exception:  # noqa: BLE001 (the client left: the transport is closing)
            return False
        self._texts.append(msg.text)
        if waiting is not None:  # the write waits for the socket to drain: finish it in a task
            self._pending = asyncio.ensure_future(_finish(write, waiting))
            # Read by _settle; if the handler is gone first (the client left), the error is moot.
            self._pending.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._push_window(asyncio.get_running_loop().time())
        return True

    def _push_window(self, now: float) -> None:
        """A reply arrived at ``now``: the idle timeout starts again (at most every ``push_s``)."""
        if now - self._pushed >= self._push_s:
            cast(asyncio.Timeout, self._window).reschedule(now + self._idle_s)
            self._pushed = now

    async def _settle(self) -> None:
        """Wait for a ``write_token`` write that waited for the socket (its failure raises here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    def _token_sse(self, text: str) -> bytes:
        """A streamed token's event. All but the text is the same for every chunk of a request, so it
        is encoded once: the event is that prefix, the text as JSON, and that suffix."""
        if not text and self.chat:  # an empty chat delta is ``{}``, not ``{"content": ""}``
            return sse_event({**self.head, "choices": [_choice(True, "", None, stream=True)]})
        around = self._token_event
        if around is None:
            marker = "\x00kvr-text\x00"
            whole = sse_event({**self.head, "choices": [_choice(self.chat, marker, None, stream=True)]})
            before, _, after = whole.rpartition(_json_text(marker))  # the text is the last string
            around = self._token_event = (before, after)
        return around[0] + _json_text(text) + around[1]

    async def _flush(self, *, eof: bool = False) -> None:
        """Write the waiting events in one write; with ``eof`` also the end of the body (one send)."""
        await self._settle()
        if self.response is None:
            return
        data = b"".join(self._out)
        self._out.clear()
        if eof:
            await self.response.write_eof(data)
        elif data:
            await _write(self.response, data)

    async def _end(self, response: web.StreamResponse) -> web.StreamResponse:
        self._ended = True
        self._out.append(SSE_DONE)
        await self._flush(eof=True)
        return response

    async def _open_stream(self, routed: Routed) -> None:
        # No length: aiohttp frames it chunked for HTTP/1.1 and close-delimited for HTTP/1.0.
        resp = web.StreamResponse(status=200, headers={"Content-Type": SSE_CONTENT_TYPE, "Cache-Control": "no-cache",
                                                       "x-kvr-worker": routed.worker_id})
        await resp.prepare(self.request)
        self.response = resp
        if self.chat:
            self._out.append(sse_event({**self.head, "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}))

    async def _complete(self, msg: Completion, routed: Routed | None, text: str) -> web.StreamResponse:
        usage = usage_body(prompt_tokens=msg.prompt_tokens, completion_tokens=msg.output_tokens,
                           cached_tokens=msg.cached_tokens)
        kvr = {"worker_id": msg.worker_id, "dp_rank": msg.dp_rank, "retries": msg.retries,
               "predicted_cached_tokens": msg.predicted_cached_tokens, "policy": routed.policy if routed else None}
        if self.response is not None:
            last = {**self.head, "choices": [_choice(self.chat, "", msg.finish_reason, stream=True)]}
            self._out.append(sse_event(last))
            if self.parsed.include_usage:
                self._out.append(sse_event({**self.head, "choices": [], "usage": usage, "kvr": kvr}))
            return await self._end(self.response)
        obj = "chat.completion" if self.chat else "text_completion"
        return json_response(200, {**self.head, "object": obj, "choices": [_choice(self.chat, text, msg.finish_reason)],
                                   "usage": usage, "kvr": kvr}, {"x-kvr-worker": msg.worker_id})


_json_text = msgspec.json.Encoder().encode


async def _finish(write: Coroutine[object, None, None], waiting: object) -> None:
    """Finish a write coroutine driven by hand (``_Exchange.write_token``) that suspended on
    ``waiting`` (what it awaits: a socket drain's future). Each time that is done the write goes
    on; its own ``await`` reads the outcome (a failure raises in it, and out of here)."""
    while True:
        if asyncio.isfuture(waiting):
            # Not ``await waiting``: the write's own await has it marked as awaited already.
            await asyncio.wait((waiting,))
        else:  # a bare yield: a turn of the loop
            await asyncio.sleep(0)
        try:
            waiting = write.send(None)
        except StopIteration:
            return


async def _write(response: web.StreamResponse, data: bytes) -> None:
    await response.write(data)  # a client that left: ConnectionError, and the request is cancelled


def generate_request(parsed: CompletionBody, *, request_id: str, alias: str | None) -> GenerateRequest:
    """The ``GenerateRequest`` the front sends for a parsed body. ``alias`` means any model; a chat
    without ``max_tokens`` stays uncapped (None), as vLLM's chat endpoint is."""
    req = GenerateRequest(request_id, prompt=parsed.prompt, token_ids=parsed.token_ids, max_tokens=parsed.max_tokens,
                          model=None if parsed.model == alias else parsed.model, cache_salt=parsed.cache_salt,
                          stream=parsed.stream)
    try:
        encode(req)
    except (OverflowError, TypeError, ValueError) as exc:  # parse_openai_body should stop these
        raise bad_request(f"the request does not encode: {str(exc)[:200]}") from None
    return req


def parse_completion_body(raw: bytes, *, chat: bool, request_id: str, alias: str | None = None) -> GenerateRequest:
    """The front's decoder: a completions body → the ``GenerateRequest`` it sends, or ``HttpError``
    (400, type ``bad_request``) saying what is wrong; nothing else (``bench/fuzz.py`` checks that)."""
    return generate_request(parse_openai_body(decode_json_body(raw), chat=chat), request_id=request_id, alias=alias)


def _choice(chat: bool, text: str, finish_reason: str | None, *, stream: bool = False) -> dict:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if stream:
        return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish_reason}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
