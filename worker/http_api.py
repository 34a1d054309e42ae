"""vLLM's OpenAI-compatible HTTP face on the emulated worker, so any router can front it.

Served (stdlib ``ThreadingHTTPServer``, HTTP/1.1, loopback by default):

* ``POST /v1/completions`` and ``/v1/chat/completions``, streaming (SSE, chunked) or
  not, with ``usage.prompt_tokens_details.cached_tokens`` (the engine's prefix hit);
  ``stream_options.include_usage``; ``return_token_ids``; ``cache_salt``; a prompt is a
  string or a list of token ids. Without ``max_tokens`` a completion has 16 tokens
  (vLLM's default) and a chat answer a length drawn by the engine.
* ``GET /v1/models``, ``/health``, ``/ping``, ``/version``, ``/metrics`` (vLLM V1 names).
* ``POST /tokenize``, ``/detokenize`` (vLLM's shapes: vllm-router's cache_aware policy
  needs ``/tokenize``), ``/reset_prefix_cache`` (vLLM) and ``/flush_cache`` (SGLang).
* For sglang-router: ``/server_info`` (``/get_server_info``), ``/model_info``
  (``/get_model_info``) without model or tokenizer paths (it would try to download
  them), ``/get_load``.
* ``POST /kvr/restart_publisher``: event-plane fault injection.

A known path asked with another method is answered 405 with an ``Allow`` header (404: unknown path).

Requests run on the same engine as the router's, through ``WorkerService.submit_local``;
handler threads never touch the engine. A model name that is one of the worker's LoRA
adapters (``--lora-modules``) runs as that adapter (its blocks hash and report the
adapter, as vLLM's do); any other name is served by the base model. A client that disconnects mid-stream aborts its request, as vLLM does.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bus.schema import Completion, Dispatch, ErrorCode, ErrorReply, TokenChunk
from core.tokenizer import apply_chat_template
from worker.vllm_exporter import render

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # vLLM's default for /v1/completions
VERSION = "0.33.0+kvr.emulated"
_MAX_BODY_BYTES = 64 * 1024 * 1024


def decode_json_body(raw: bytes) -> dict[str, Any]:
    """A request body → its JSON object, or ``HttpError`` 400 (the HTTP edge's one error)."""
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: "[[[[..." nesting
        raise HttpError(400, f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    return body


def prompt_ids(body: dict[str, Any], *, chat: bool, tokenizer: Any) -> list[int]:
    """The prompt of a (chat) completions or tokenize body as token ids, or ``HttpError`` 400.
    Ids are not range-checked here: the engine refuses those outside uint32 (a 400 as well)."""
    try:
        return _prompt_ids(body, chat=chat, tokenizer=tokenizer)
    except UnicodeEncodeError as exc:  # JSON's "\ud800": a lone surrogate no tokenizer can encode (was a 500)
        raise HttpError(400, f"the prompt is not valid Unicode: {exc}") from None


def _prompt_ids(body: dict[str, Any], *, chat: bool, tokenizer: Any) -> list[int]:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise HttpError(400, "'messages' must be a list of objects")
        return tokenizer.encode(apply_chat_template(messages, add_generation_prompt=body.get("add_generation_prompt", True)))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise HttpError(400, "'prompt' must be a string or a list of token ids (batches are not supported)")


def completion_params(body: dict[str, Any], *, chat: bool, tokenizer: Any) -> tuple[list[int], int, str | None]:
    """``(token ids, max_tokens, cache_salt)`` of a completions body, or ``HttpError`` 400."""
    ids = prompt_ids(body, chat=chat, tokenizer=tokenizer)
    if body.get("n", 1) != 1:
        raise HttpError(400, "only n=1 is supported")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = 0 if chat else DEFAULT_COMPLETION_MAX_TOKENS  # 0: the engine draws a length
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise HttpError(400, "'max_tokens' must be a positive integer")
    salt = body.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise HttpError(400, "'cache_salt' must be a string")
    return ids, max_tokens, salt


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


_GET_PATHS = frozenset({
    "/health", "/ping", "/version", "/v1/models", "/metrics", "/server_info", "/get_server_info", "/model_info",
    "/get_model_info", "/kvr/cached_blocks", "/get_load",
})
_POST_PATHS = frozenset({
    "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/reset_prefix_cache", "/flush_cache",
    "/kvr/faults", "/kvr/restart_publisher",
})
_ERROR_STATUS = {
    ErrorCode.PROMPT_TOO_LONG: 400, ErrorCode.BAD_REQUEST: 400, ErrorCode.CANCELLED: 499,
    ErrorCode.TIMEOUT: 504, ErrorCode.WORKER_ERROR: 503,
}  # fmt: skip


class HttpFront:
    """The HTTP server; :meth:`start` serves in a daemon thread, :meth:`close` stops it."""

    def __init__(self, *, service: Any, backend: Any, host: str = "127.0.0.1", port: int = 0,
                 request_timeout_s: float = 600.0) -> None:
        self.service = service
        self.backend = backend
        self.request_timeout_s = request_timeout_s
        self.created = int(time.time())
        front = self

        class Handler(_Handler):
            pass

        Handler.front = front
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, name="kvr-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def on_loop(self, fn, timeout_s: float = 5.0):
        """Run ``fn`` on the worker loop thread and wait for its result."""
        return self.service.call(fn).result(timeout=timeout_s)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    front: HttpFront

    def log_message(self, fmt: str, *args: Any) -> None:
        logger.debug("http %s " + fmt, self.address_string(), *args)

    # ------------------------------------------------------------------ plumbing

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_text(self, status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        self._send_json(status, {"error": {"message": message, "type": kind, "param": None, "code": status}})

    def _body(self) -> dict[str, Any]:
        try:
            length = int((self.headers.get("Content-Length") or "0").strip())
        except ValueError:
            length = -1
        if length < 0:  # rfile.read(-1) would wait for the client to close: a hang
            self.close_connection = True
            raise HttpError(400, "invalid Content-Length")
        if length > _MAX_BODY_BYTES:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise HttpError(413, f"request body over {_MAX_BODY_BYTES} bytes")
        return decode_json_body(self.rfile.read(length) if length else b"{}")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _sse(self, obj: Any) -> None:
        self._chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

    # ------------------------------------------------------------------ routes

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        f = self.front
        path = self.path.split("?", 1)[0]
        try:
            if path in ("/health", "/ping"):
                self._send_text(200, "")
            elif path == "/version":
                self._send_json(200, {"version": VERSION})
            elif path == "/v1/models":
                cards = [self._model_card()] + [self._lora_card(n) for n in f.backend.config.lora_modules]
                self._send_json(200, {"object": "list", "data": cards})
            elif path == "/metrics":
                self._send_text(200, render(f.on_loop(f.backend.snapshot)), "text/plain; version=0.0.4; charset=utf-8")
            elif path in ("/server_info", "/get_server_info"):
                cfg = f.backend.engine.config
                self._send_json(200, {"served_model_name": f.backend.config.model,
                                      "dp_size": getattr(f.backend, "dp_size", 1), "tp_size": 1,
                                      "page_size": cfg.block_size, "max_total_num_tokens": cfg.num_gpu_blocks * cfg.block_size,
                                      "engine": "kvr-emulated", "profile": f.backend.config.profile})
            elif path in ("/model_info", "/get_model_info"):
                self._send_json(200, {"model_type": "kvr-emulated", "architectures": ["KvrEmulatedForCausalLM"],
                                      "is_generation": True})
            elif path == "/kvr/cached_blocks":  # the engine's truth, to compare with a router's index
                self._send_json(200, {"blocks": f.on_loop(f.backend.cached_block_keys)})
            elif path == "/get_load":
                load = f.on_loop(lambda: f.backend.load(0))
                self._send_json(200, {"load": load.queued_prefill_tokens, "aggregate": {"total_tokens": load.queued_prefill_tokens},
                                      "loads": [{"dp_rank": 0, "num_reqs": load.running + load.waiting,
                                                 "num_tokens": load.queued_prefill_tokens, "num_total_tokens": load.queued_prefill_tokens}]})
            else:
                self._no_route(path)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:  # a bug must not kill the connection silently
            logger.exception("GET %s failed", path)
            self._error(500, "internal error", "InternalServerError")

    def do_POST(self) -> None:  # noqa: N802
        f = self.front
        path = self.path.split("?", 1)[0]
        try:
            if path not in _POST_PATHS:
                self._other_method()
                return
            body = self._body()
            if path == "/v1/completions":
                self._completions(body, chat=False)
            elif path == "/v1/chat/completions":
                self._completions(body, chat=True)
            elif path == "/tokenize":
                ids = self._prompt_ids(body, chat="messages" in body)
                self._send_json(200, {"count": len(ids), "max_model_len": f.backend.engine.max_model_len,
                                      "tokens": ids, "token_strs": None})
            elif path == "/detokenize":
                tokens = body.get("tokens")
                if not isinstance(tokens, list) or not all(isinstance(t, int) and t >= 0 for t in tokens):
                    raise HttpError(400, "'tokens' must be a list of non-negative integers")
                try:
                    text = f.backend.tokenizer.decode(tokens)
                except ValueError as exc:  # an id outside the vocabulary (vLLM: 400 as well)
                    raise HttpError(400, str(exc)) from None
                self._send_json(200, {"prompt": text})
            elif path in ("/reset_prefix_cache", "/flush_cache"):
                # vLLM: ?reset_running_requests=true preempts running requests so the reset succeeds.
                preempt = "reset_running_requests=true" in self.path.lower()
                ok = f.on_loop(lambda: f.backend.reset_prefix_cache(preempt))
                self._send_json(200 if ok else 409, {"success": ok})
            elif path == "/kvr/faults":  # event-plane fault rates from now on ({} = none)
                from bus.publisher import FaultPlan

                try:
                    plan = FaultPlan(**{k: float(v) for k, v in body.items()}) if body else None
                except (TypeError, ValueError) as exc:
                    raise HttpError(400, f"bad fault plan: {exc}") from None
                f.on_loop(lambda: f.backend.set_faults(plan))
                self._send_json(200, {"success": True})
            elif path == "/kvr/restart_publisher":
                f.on_loop(f.backend.restart_publisher)
                self._send_json(200, {"success": True})
        except HttpError as exc:
            self._error(exc.status, str(exc), exc.kind)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:  # malformed input that slipped past validation, or a bug
            logger.exception("POST %s failed", path)
            self._error(500, "internal error", "InternalServerError")

    def _other_method(self) -> None:
        self.close_connection = True  # a body it may carry is not read
        self._no_route(self.path.split("?", 1)[0])

    do_PUT = do_DELETE = do_PATCH = _other_method  # noqa: N815 (http.server's naming)

    def _no_route(self, path: str) -> None:
        """405 with ``Allow`` for a path served under another method, else 404."""
        allowed = [m for m, paths in (("GET", _GET_PATHS), ("POST", _POST_PATHS)) if path in paths]
        if allowed:
            self._send_json(405, {"error": {"message": f"method {self.command} not allowed on {path}",
                                            "type": "MethodNotAllowedError", "param": None, "code": 405}},
                            {"Allow": ", ".join(allowed)})
        else:
            self._error(404, f"no route {path}", "NotFoundError")

    # ------------------------------------------------------------------ generation

    def _model_card(self) -> dict[str, Any]:
        f = self.front
        name = f.backend.config.model
        return {"id": name, "object": "model", "created": f.created, "owned_by": "kvr", "root": name,
                "parent": None, "max_model_len": f.backend.engine.max_model_len, "permission": []}

    def _lora_card(self, name: str) -> dict[str, Any]:
        f = self.front
        return {"id": name, "object": "model", "created": f.created, "owned_by": "kvr", "root": f"/lora/{name}",
                "parent": f.backend.config.model, "max_model_len": f.backend.engine.max_model_len, "permission": []}

    def _prompt_ids(self, body: dict[str, Any], *, chat: bool) -> list[int]:
        return prompt_ids(body, chat=chat, tokenizer=self.front.backend.tokenizer)

    def _completions(self, body: dict[str, Any], *, chat: bool) -> None:
        f = self.front
        ids, max_tokens, salt = completion_params(body, chat=chat, tokenizer=f.backend.tokenizer)
        stream = bool(body.get("stream", False))
        options = body.get("stream_options")
        include_usage = bool(options.get("include_usage", False)) if isinstance(options, dict) else False
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        model = body.get("model")
        lora = model if isinstance(model, str) and model in f.backend.config.lora_modules else None
        rank = self.headers.get("X-data-parallel-rank")  # vLLM's header; otherwise any rank (-1)
        try:
            dp_rank = -1 if rank is None else int(rank)
        except ValueError:
            raise HttpError(400, "X-data-parallel-rank must be an integer") from None
        f.service.submit_local(Dispatch(request_id=rid, token_ids=ids, max_tokens=max_tokens, dp_rank=dp_rank,
                                        lora_name=lora, cache_salt=salt), inbox.put)
        first = self._next(inbox, rid)
        if isinstance(first, ErrorReply):
            raise HttpError(_ERROR_STATUS.get(first.code, 500), first.message, first.code.value)
        ctx = _Response(rid=rid, model=body.get("model") or f.backend.config.model, chat=chat, prompt_ids=ids,
                        return_token_ids=bool(body.get("return_token_ids", False)))
        extra = {"x-request-id": self.headers.get("x-request-id") or rid}
        if stream:
            self._stream(inbox, first, ctx, include_usage, extra)
        else:
            self._collect(inbox, first, ctx, extra)

    def _next(self, inbox: queue.SimpleQueue, rid: str):
        try:
            msg = inbox.get(timeout=self.front.request_timeout_s)
        except queue.Empty:
            self.front.service.cancel_local(rid)
            raise HttpError(504, "request timed out", "TimeoutError") from None
        if msg is None:
            raise HttpError(503, "the worker is shutting down", "ServiceUnavailableError")
        return msg

    def _collect(self, inbox, msg, ctx: _Response, extra: dict[str, str]) -> None:
        tokens: list[int] = []
        texts: list[str] = []
        while not isinstance(msg, (Completion, ErrorReply)):
            if isinstance(msg, TokenChunk):
                tokens.extend(msg.token_ids)
                texts.append(msg.text)
            msg = self._next(inbox, ctx.rid)
        if isinstance(msg, ErrorReply):
            raise HttpError(_ERROR_STATUS.get(msg.code, 500), msg.message, msg.code.value)
        self._send_json(200, ctx.full("".join(texts), tokens, msg), extra)

    def _stream(self, inbox, msg, ctx: _Response, include_usage: bool, extra: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        try:
            if ctx.chat:
                self._sse(ctx.chunk({"role": "assistant", "content": ""}, None))
            while not isinstance(msg, (Completion, ErrorReply)):
                if isinstance(msg, TokenChunk):
                    self._sse(ctx.chunk(msg.text, None, msg.token_ids))
                msg = self._next(inbox, ctx.rid)
            if isinstance(msg, ErrorReply):
                self._sse({"error": {"message": msg.message, "type": msg.code.value, "code": 500}})
            else:
                self._sse(ctx.chunk("" if not ctx.chat else {}, msg.finish_reason))
                if include_usage:
                    self._sse({**ctx.head(), "choices": [], "usage": ctx.usage(msg)})
            self._sse(b"[DONE]")
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.front.service.cancel_local(ctx.rid)  # the client went away: abort, as vLLM does
        except HttpError:
            self.close_connection = True


class _Response:
    """Builds OpenAI response bodies for one request."""

    def __init__(self, *, rid: str, model: str, chat: bool, prompt_ids: list[int], return_token_ids: bool) -> None:
        self.rid = rid
        self.model = model
        self.chat = chat
        self.prompt_ids = prompt_ids
        self.return_token_ids = return_token_ids
        self.created = int(time.time())

    def head(self) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if self.chat else "text_completion")
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model}

    @staticmethod
    def usage(done: Completion) -> dict[str, Any]:
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.output_tokens,
                "total_tokens": done.prompt_tokens + done.output_tokens,
                "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}

    def chunk(self, delta: Any, finish_reason: str | None, token_ids: list[int] | None = None) -> dict[str, Any]:
        if self.chat:
            d = delta if isinstance(delta, dict) else {"content": delta}
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}
        if self.return_token_ids and token_ids is not None:
            choice["token_ids"] = token_ids
        return {**self.head(), "choices": [choice]}

    def full(self, text: str, tokens: list[int], done: Completion) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                      "logprobs": None, "finish_reason": done.finish_reason, "stop_reason": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason,
                      "stop_reason": None, "prompt_logprobs": None}
            obj = "text_completion"
        body = {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                "usage": self.usage(done)}
        if self.return_token_ids:
            choice["token_ids"] = tokens
            choice["prompt_token_ids"] = self.prompt_ids
        return body
