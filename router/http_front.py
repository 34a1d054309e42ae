"""The router's OpenAI-compatible HTTP front: one more client of the router's client channel.

Served (stdlib ``ThreadingHTTPServer``, HTTP/1.1):

* ``POST /v1/completions`` and ``/v1/chat/completions``: streaming (SSE, chunked) or not; a
  prompt is a string or a list of token ids; ``usage.prompt_tokens_details.cached_tokens`` is the
  engine's prefix hit; a ``kvr`` object (and ``x-kvr-worker`` header) says where it ran and
  what the router predicted;
* ``GET /v1/models``: the model names the registered workers serve (their ``Hello``; the same
  names an unknown model's error lists), then the front's alias if it has one (``--model-name``:
  accepted for any served model);
* ``GET /health`` (200 while a worker is registered, else 503), ``/metrics`` (Prometheus text:
  router counters and per-target index and load gauges).

A known path asked with another method is answered 405 with an ``Allow`` header (404: unknown path).

HTTP handler threads never touch the router's sockets: a bridge thread owns one DEALER to the
router's client ROUTER and hands replies to each handler's queue (woken through a socket pair).
Errors map to HTTP statuses (bad request 400, prompt too long or body over 64 MiB 413, unknown
model 404, overloaded 429, no workers 503, timeout 504...) with OpenAI-style JSON whose ``type`` is
the stable ``ErrorCode`` value. Bodies are decoded by :func:`parse_completion_body`, the HTTP
edge's one decoder: anything it accepts crosses the bridge (encodes, decodes at the router).
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import zmq

from bus.codec import DecodeError, encode, reply_decoder
from bus.schema import CancelRequest, Completion, ErrorCode, ErrorReply, GenerateRequest, Routed, TokenChunk
from bus.security import Curve
from bus.sockets import MAX_REQUEST_BYTES, make_socket
from core.tokenizer import apply_chat_template

logger = logging.getLogger(__name__)

_MAX_BODY_BYTES = 64 * 1024 * 1024
_MAX_TOKEN_ID = 2**32  # kvr hashes token ids as uint32 (core/hashing.py); the router says the same
_MAX_WIRE_INT = 2**63  # what msgpack carries as a signed int; bigger is refused here, not in the bridge
_GET_PATHS = frozenset({"/health", "/v1/models", "/metrics"})
_POST_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
_STATUS = {
    ErrorCode.BAD_REQUEST: 400, ErrorCode.PROMPT_TOO_LONG: 413, ErrorCode.UNKNOWN_MODEL: 404,
    ErrorCode.NO_WORKERS: 503, ErrorCode.OVERLOADED: 429, ErrorCode.TIMEOUT: 504, ErrorCode.CANCELLED: 499,
    ErrorCode.WORKER_DIED: 502, ErrorCode.WORKER_ERROR: 502, ErrorCode.ROUTER_RESTARTED: 503,
}  # fmt: skip


class _Bridge:
    """Owns the DEALER to the router; handler threads submit through a queue."""

    def __init__(self, ctx: zmq.Context, endpoint: str, curve: Curve | None = None,
                 max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        self._ctx, self._endpoint, self._curve = ctx, endpoint, curve
        self._max_request_bytes = max_request_bytes
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._inboxes: dict[str, queue.SimpleQueue] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvr-http-bridge", daemon=True)
        self._thread.start()

    def submit(self, request: GenerateRequest) -> queue.SimpleQueue:
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            self._inboxes[request.request_id] = inbox
        self._send(request)
        return inbox

    def cancel(self, request_id: str) -> None:
        self._send(CancelRequest(request_id))

    def _send(self, msg) -> None:
        self._out.put(msg)
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _run(self) -> None:
        sock = make_socket(self._ctx, zmq.DEALER, max_msg_size=MAX_REQUEST_BYTES,
                           setup=None if self._curve is None else self._curve.dial)
        sock.connect(self._endpoint)
        decoder = reply_decoder()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        try:
            while not self._stop.is_set():
                poller.poll(100)
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
                while True:
                    try:
                        msg = self._out.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        data = encode(msg)
                    except (OverflowError, TypeError, ValueError) as exc:  # parse_completion_body should stop these
                        logger.warning("request %s does not encode: %s", msg.request_id, exc)
                        self._fail(msg.request_id, ErrorReply(msg.request_id, ErrorCode.BAD_REQUEST, f"unencodable: {exc}"))
                        continue
                    if len(data) > self._max_request_bytes:
                        # The router would cut this DEALER's connection (ZMQ_MAXMSGSIZE) and with it
                        # the replies of every other HTTP request in flight: refuse this one here.
                        self._fail(msg.request_id, ErrorReply(
                            msg.request_id, ErrorCode.PROMPT_TOO_LONG,
                            f"request of {len(data)} bytes is over the router's {self._max_request_bytes}-byte limit"))
                        continue
                    sock.send(data)
                while sock.poll(0):
                    try:
                        reply = decoder.decode(sock.recv())
                    except DecodeError as exc:
                        logger.warning("undecodable reply from the router: %s", exc)
                        continue
                    with self._lock:
                        inbox = self._inboxes.get(reply.request_id)
                        if isinstance(reply, (Completion, ErrorReply)):
                            self._inboxes.pop(reply.request_id, None)
                    if inbox is not None:
                        inbox.put(reply)
        finally:
            sock.close(linger=0)
            with self._lock:
                for inbox in self._inboxes.values():
                    inbox.put(None)
                self._inboxes.clear()

    def _fail(self, request_id: str, reply: ErrorReply) -> None:
        with self._lock:
            inbox = self._inboxes.pop(request_id, None)
        if inbox is not None:
            inbox.put(reply)

    def close(self) -> None:
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(5)
        self._wake_r.close()
        self._wake_w.close()


class RouterHttpFront:
    """Serve the OpenAI API in front of a router; ``start`` serves in a daemon thread."""

    def __init__(self, *, client_endpoint: str, host: str = "127.0.0.1", port: int = 0, model: str | None = None,
                 stats: Callable[[], dict] | None = None, ctx: zmq.Context | None = None,
                 request_timeout_s: float = 600.0, curve: Curve | None = None,
                 max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        """``model``: an alias accepted for any served model, listed after the served names.
        ``stats``: the router's snapshot (``RouterService.stats``); its ``models`` are the served names.
        ``curve``: the bridge dials the router's client port as a CURVE client (bus/security.py).
        ``max_request_bytes``: the router's limit; bigger requests are refused here (PROMPT_TOO_LONG)."""
        self.model = model
        self.stats = stats or (lambda: {})
        self.request_timeout_s = request_timeout_s
        self.created = int(time.time())
        self._ids = itertools.count(1)
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        self.bridge = _Bridge(self._ctx, client_endpoint, curve, max_request_bytes)
        handler = type("Handler", (_Handler,), {"front": self})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def model_names(self) -> list[str]:
        """What ``/v1/models`` lists: the served names the workers registered, then the alias."""
        served = list(self.stats().get("models") or ())
        return served + ([self.model] if self.model and self.model not in served else [])

    def default_model(self) -> str:
        """The ``model`` of a response whose request named none: the one served model, else the alias."""
        served = self.stats().get("models") or ()
        return served[0] if len(served) == 1 else (self.model or "")

    def next_id(self, chat: bool) -> str:
        return f"{'chatcmpl' if chat else 'cmpl'}-{next(self._ids)}-{self.created}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, name="kvr-router-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.bridge.close()
        if self._own_ctx:
            self._ctx.term()


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    front: RouterHttpFront

    def log_message(self, fmt: str, *args: Any) -> None:
        logger.debug("http %s " + fmt, self.address_string(), *args)

    def _send(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(body).encode(), "application/json", headers)

    def _error(self, status: int, message: str, kind: str) -> None:
        self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": status}})

    def _sse(self, obj: Any) -> None:
        data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        f = self.front
        path = self.path.split("?", 1)[0]
        try:
            if path == "/health":
                workers = f.stats().get("workers", 0)
                self._send(200 if workers else 503, f"{workers} worker(s)\n".encode(), "text/plain")
            elif path == "/v1/models":
                cards = [{"id": name, "object": "model", "created": f.created, "owned_by": "kvr"}
                         for name in f.model_names()]
                self._json(200, {"object": "list", "data": cards})
            elif path == "/metrics":
                self._send(200, render_metrics(f.stats()).encode(), "text/plain; version=0.0.4; charset=utf-8")
            else:
                self._no_route(path)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _other_method(self) -> None:
        self.close_connection = True  # a body it may carry is not read
        self._no_route(self.path.split("?", 1)[0])

    do_PUT = do_DELETE = do_PATCH = _other_method  # noqa: N815 (http.server's naming)

    def _no_route(self, path: str) -> None:
        """405 with ``Allow`` for a path served under another method, else 404."""
        allowed = [m for m, paths in (("GET", _GET_PATHS), ("POST", _POST_PATHS)) if path in paths]
        if allowed:
            self._json(405, {"error": {"message": f"method {self.command} not allowed on {path}",
                                       "type": "MethodNotAllowedError", "param": None, "code": 405}},
                       {"Allow": ", ".join(allowed)})
        else:
            self._error(404, f"no route {path}", "NotFoundError")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        try:
            try:
                length = _content_length(self.headers.get("Content-Length"))
            except HttpError:
                self.close_connection = True  # where the body ends is unknown: nothing after it can be read
                raise
            if length > _MAX_BODY_BYTES:
                self.close_connection = True  # the unread body must not be taken for the next request
                raise HttpError(413, f"request body of {length} bytes is over the {_MAX_BODY_BYTES}-byte limit",
                                ErrorCode.PROMPT_TOO_LONG.value)
            raw = self.rfile.read(length) if length else b""
            if path in ("/v1/completions", "/v1/chat/completions"):
                chat = path.endswith("chat/completions")
                self._completions(raw, chat=chat)
            else:
                self._no_route(path)
        except HttpError as exc:
            self._error(exc.status, str(exc), exc.kind)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:  # a bug must not drop the connection without an answer
            logger.exception("POST %s failed", path)
            self.close_connection = True
            try:
                self._error(500, "internal error", ErrorCode.INTERNAL.value)
            except OSError:
                pass

    # ------------------------------------------------------------------ generation

    def _completions(self, raw: bytes, *, chat: bool) -> None:
        f = self.front
        rid = f.next_id(chat)
        req, body = parse_completion(raw, chat=chat, request_id=rid, alias=f.model)
        inbox = f.bridge.submit(req)
        routed: Routed | None = None
        model = body.get("model") or f.default_model()
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": model}
        streaming = False
        texts: list[str] = []
        tokens: list[int] = []
        while True:
            try:
                msg = inbox.get(timeout=f.request_timeout_s)
            except queue.Empty:
                f.bridge.cancel(rid)
                msg = ErrorReply(rid, ErrorCode.TIMEOUT, "no reply from the router in time")
            if msg is None:
                msg = ErrorReply(rid, ErrorCode.ROUTER_RESTARTED, "the HTTP front is shutting down")
            if isinstance(msg, Routed):
                routed = msg
                if req.stream:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("x-kvr-worker", msg.worker_id)
                    self.end_headers()
                    streaming = True
                    if chat:
                        self._sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                        "finish_reason": None}]})
            elif isinstance(msg, TokenChunk):
                texts.append(msg.text)
                tokens.extend(msg.token_ids)
                if streaming:
                    try:
                        self._sse({**head, "choices": [_choice(chat, msg.text, None, stream=True)]})
                    except (BrokenPipeError, ConnectionResetError):
                        f.bridge.cancel(rid)  # the client went away: abort, as vLLM does
                        raise
            elif isinstance(msg, ErrorReply):
                if streaming:
                    self._sse({"error": {"message": msg.message, "type": msg.code.value, "code": 500}})
                    self._sse(b"[DONE]")
                    self.wfile.write(b"0\r\n\r\n")
                    return
                raise HttpError(_STATUS.get(msg.code, 500), msg.message, msg.code.value)
            elif isinstance(msg, Completion):
                usage = {"prompt_tokens": msg.prompt_tokens, "completion_tokens": msg.output_tokens,
                         "total_tokens": msg.prompt_tokens + msg.output_tokens,
                         "prompt_tokens_details": {"cached_tokens": msg.cached_tokens}}
                kvr = {"worker_id": msg.worker_id, "dp_rank": msg.dp_rank, "retries": msg.retries,
                       "predicted_cached_tokens": msg.predicted_cached_tokens,
                       "policy": routed.policy if routed else None}
                if streaming:
                    self._sse({**head, "choices": [_choice(chat, "", msg.finish_reason, stream=True)]})
                    if (body.get("stream_options") or {}).get("include_usage"):  # a dict or null (parsed)
                        self._sse({**head, "choices": [], "usage": usage, "kvr": kvr})
                    self._sse(b"[DONE]")
                    self.wfile.write(b"0\r\n\r\n")
                    return
                obj = "chat.completion" if chat else "text_completion"
                self._json(200, {**head, "object": obj, "choices": [_choice(chat, "".join(texts), msg.finish_reason)],
                                 "usage": usage, "kvr": kvr}, {"x-kvr-worker": msg.worker_id})
                return


def _content_length(value: str | None) -> int:
    if value is None or value == "":
        return 0
    try:
        length = int(value.strip())
    except ValueError:
        raise HttpError(400, f"invalid Content-Length {value[:40]!r}", ErrorCode.BAD_REQUEST.value) from None
    if length < 0:
        raise HttpError(400, f"invalid Content-Length {length}", ErrorCode.BAD_REQUEST.value)
    return length


def _bad(message: str) -> HttpError:
    return HttpError(400, message, ErrorCode.BAD_REQUEST.value)


def parse_completion_body(raw: bytes, *, chat: bool, request_id: str, alias: str | None = None,
                          _body_out: dict | None = None) -> GenerateRequest:
    """The HTTP edge's decoder: a completions body → a ``GenerateRequest`` the client channel
    carries, or ``HttpError`` (400, type ``bad_request``) saying what is wrong; nothing else.

    Only what the router cannot judge is checked here: JSON shape and types, and numbers too big
    for msgpack (which would fail in the bridge, not in this request). Limits (``max_tokens``,
    prompt length, vocabulary, models) are the router's, so ZMQ and HTTP clients get the same
    answers. ``alias`` is the model name the front lists (``/v1/models``): it means any model.
    """
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _bad(f"invalid JSON: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    if _body_out is not None:
        _body_out["body"] = body
    prompt, token_ids = None, None
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages) or not messages:
            raise _bad("'messages' must be a non-empty list of objects")
        prompt = apply_chat_template(messages, add_generation_prompt=True)
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            prompt = p
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            bad = next((t for t in p if not 0 <= t < _MAX_TOKEN_ID), None)
            if bad is not None:
                raise _bad(f"token id {bad} is outside [0, {_MAX_TOKEN_ID})")
            token_ids = p  # empty: the router's "token_ids is empty"
        else:
            raise _bad("'prompt' must be a string or a list of token ids (batches are not supported)")
    if body.get("n", 1) != 1:
        raise _bad("only n=1 is supported")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 16))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _bad("'max_tokens' must be a positive integer")
    if max_tokens >= _MAX_WIRE_INT:
        raise _bad(f"'max_tokens' {max_tokens} is too large")
    salt = body.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise _bad("'cache_salt' must be a string")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("'model' must be a string")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("'stream_options' must be an object")
    req = GenerateRequest(request_id, prompt=prompt, token_ids=token_ids, max_tokens=max_tokens,
                          model=None if model == alias else model, cache_salt=salt, stream=bool(body.get("stream")))
    try:
        encode(req)  # JSON's "\ud800" is a lone surrogate: no UTF-8, so no msgpack (the bridge would fail)
    except (UnicodeEncodeError, OverflowError) as exc:
        raise _bad(f"the request does not encode: {str(exc)[:200]}") from None
    return req


def parse_completion(raw: bytes, *, chat: bool, request_id: str, alias: str | None = None
                     ) -> tuple[GenerateRequest, dict]:
    """:func:`parse_completion_body` and the JSON object it read (for the response's options)."""
    box: dict = {}
    req = parse_completion_body(raw, chat=chat, request_id=request_id, alias=alias, _body_out=box)
    return req, box["body"]


def _choice(chat: bool, text: str, finish_reason: str | None, *, stream: bool = False) -> dict:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if stream:
        return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish_reason}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}


def render_metrics(stats: dict) -> str:
    """Prometheus text exposition of the router's stats snapshot (``RouterService.stats``)."""
    lines = []
    for name, value in sorted((stats.get("counters") or {}).items()):
        metric = f"kvr_router_{name}_total"
        lines += [f"# TYPE {metric} counter", f"{metric} {value}"]
    for metric, key in (("kvr_router_workers", "workers"), ("kvr_router_pending_requests", "pending"),
                        ("kvr_router_indexed_blocks", "indexed_blocks")):
        lines += [f"# TYPE {metric} gauge", f"{metric} {stats.get(key, 0)}"]
    targets = stats.get("targets") or {}
    for field in ("indexed_blocks", "in_flight", "queued_prefill_tokens", "events_applied", "gaps", "resets",
                  "replays", "event_lag_s"):
        metric = f"kvr_router_target_{field}"
        lines.append(f"# TYPE {metric} gauge")
        for name, t in sorted(targets.items()):
            wid, _, rank = name.rpartition("/")
            lines.append(f'{metric}{{worker="{wid}",dp_rank="{rank}",confidence="{t["confidence"]}"}} {t[field]}')
    return "\n".join(lines) + "\n"
