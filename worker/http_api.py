"""vLLM's OpenAI-compatible HTTP face on the emulated worker, so any router can front it.

Served (aiohttp through ``bus/http_server.py``, loopback by default; bodies, errors and SSE per
``bus/openai_http.py``, the same decoder as the router's front):

* ``POST /v1/completions`` and ``/v1/chat/completions``, streaming (SSE, chunked) or
  not, with ``usage.prompt_tokens_details.cached_tokens`` (the engine's prefix hit);
  ``stream_options.include_usage``; ``return_token_ids``; ``cache_salt``; a prompt is a
  string or a list of token ids. Without ``max_tokens`` a completion has 16 tokens
  (vLLM's default) and a chat answer is uncapped (vLLM): the engine draws its length, its stand-in
  for the model's end of sequence, within ``max_model_len``.
* ``GET /v1/models``, ``/health``, ``/ping``, ``/version``, ``/metrics`` (vLLM V1 names).
* ``POST /tokenize``, ``/detokenize`` (vLLM's shapes: vllm-router's cache_aware policy
  needs ``/tokenize``), ``/reset_prefix_cache`` (vLLM) and ``/flush_cache`` (SGLang).
* For sglang-router: ``/server_info`` (``/get_server_info``), ``/model_info``
  (``/get_model_info``) without model or tokenizer paths (it would try to download
  them), ``/get_load``.
* ``POST /kvr/restart_publisher``: event-plane fault injection.

A known path asked with another method is answered 405 with an ``Allow`` header (404: unknown path).

Requests run on the same engine as the router's, through ``WorkerService.submit_local``;
the HTTP loop never touches the engine (``on_loop`` runs a call on the worker's loop thread).
A model name that is one of the worker's LoRA adapters (``--lora-modules``) runs as that
adapter (its blocks hash and report the adapter, as vLLM's do); any other name is served by
the base model. A client that disconnects (streaming or not) aborts its request, as vLLM does.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from aiohttp import web

from bus.http_server import MAX_IN_FLIGHT, HttpServer, json_response, read_body
from bus.openai_http import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    SSE_CONTENT_TYPE,
    SSE_DONE,
    VLLM_STATUS_FOR_CODE,
    CompletionBody,
    HttpError,
    bad_request,
    decode_json_body,
    no_route,
    parse_completion_body,
    parse_prompt,
    sse_error,
    sse_event,
    usage_body,
)
from bus.schema import NO_CAP, Completion, Dispatch, ErrorReply, TokenChunk
from worker.vllm.exporter import render

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_COMPLETION_MAX_TOKENS", "HttpError", "HttpFront", "completion_params", "decode_json_body",
           "prompt_ids"]
VERSION = "0.33.0+kvr.emulated"
def prompt_ids(body: dict[str, Any], *, chat: bool, tokenizer: Any) -> list[int]:
    """The prompt of a (chat) completions or tokenize body as token ids, or a 400."""
    text, ids = parse_prompt(body, chat=chat)
    return list(ids) if ids is not None else tokenizer.encode(text)


def completion_params(body: dict[str, Any], *, chat: bool, tokenizer: Any) -> tuple[list[int], int, str | None]:
    """``(token ids, max_tokens, cache_salt)`` of a completions body (the engine's ``Dispatch``
    fields; ``max_tokens`` 0: the engine draws a length), or ``HttpError`` 400."""
    parsed = parse_completion_body(body, chat=chat)
    return _dispatch_fields(parsed, tokenizer)


def _dispatch_fields(parsed: CompletionBody, tokenizer: Any) -> tuple[list[int], int, str | None]:
    ids = list(parsed.token_ids) if parsed.token_ids is not None else tokenizer.encode(parsed.prompt)
    # A chat without max_tokens (vLLM: no cap): the emulated engine draws a length, its stand-in
    # for the model's end of sequence, within max_model_len.
    return ids, NO_CAP if parsed.max_tokens is None else parsed.max_tokens, parsed.cache_salt


_GET_PATHS = frozenset({
    "/health", "/ping", "/version", "/v1/models", "/metrics", "/server_info", "/get_server_info", "/model_info",
    "/get_model_info", "/kvr/cached_blocks", "/get_load",
})
_POST_PATHS = frozenset({
    "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/reset_prefix_cache", "/flush_cache",
    "/kvr/faults", "/kvr/restart_publisher",
})


class HttpFront:
    """The HTTP server; :meth:`start` serves in a daemon thread, :meth:`close` stops it."""

    def __init__(self, *, service: Any, backend: Any, host: str = "127.0.0.1", port: int = 0,
                 request_timeout_s: float = 600.0, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.service = service
        self.backend = backend
        self.request_timeout_s = request_timeout_s
        self.created = int(time.time())
        self.server = HttpServer(handle=self._handle, host=host, port=port, name="kvr-http",
                                 max_in_flight=max_in_flight)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> None:
        self.server.start()

    def close(self) -> None:
        self.server.close()

    async def on_loop(self, fn, timeout_s: float = 5.0):
        """Run ``fn`` on the worker loop thread; its result (handlers never touch the engine)."""
        return await asyncio.wait_for(asyncio.wrap_future(self.service.call(fn)), timeout_s)

    # ------------------------------------------------------------------ routes

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path, method = request.path, request.method
        if method == "GET" and path in _GET_PATHS:
            return await self._get(path)
        if method == "POST" and path in _POST_PATHS:
            return await self._post(request, path, decode_json_body(await read_body(request)))
        raise no_route(method, path, get_paths=_GET_PATHS, post_paths=_POST_PATHS)

    async def _get(self, path: str) -> web.StreamResponse:
        b = self.backend
        if path in ("/health", "/ping"):
            return web.Response(status=200, text="")
        if path == "/version":
            return json_response(200, {"version": VERSION})
        if path == "/v1/models":
            cards = [self._model_card()] + [self._lora_card(n) for n in b.config.lora_modules]
            return json_response(200, {"object": "list", "data": cards})
        if path == "/metrics":
            return web.Response(body=render(await self.on_loop(b.snapshot)).encode(),
                                headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
        if path in ("/server_info", "/get_server_info"):
            cfg = b.engine.config
            return json_response(200, {"served_model_name": b.config.model, "dp_size": getattr(b, "dp_size", 1),
                                       "tp_size": 1, "page_size": cfg.block_size,
                                       "max_total_num_tokens": cfg.num_gpu_blocks * cfg.block_size,
                                       "engine": "kvr-emulated", "profile": b.config.profile})
        if path in ("/model_info", "/get_model_info"):
            return json_response(200, {"model_type": "kvr-emulated", "architectures": ["KvrEmulatedForCausalLM"],
                                       "is_generation": True})
        if path == "/kvr/cached_blocks":  # the engine's truth, to compare with a router's index
            return json_response(200, {"blocks": await self.on_loop(b.cached_block_keys)})
        load = await self.on_loop(lambda: b.load(0))  # /get_load
        return json_response(200, {"load": load.queued_prefill_tokens,
                                   "aggregate": {"total_tokens": load.queued_prefill_tokens},
                                   "loads": [{"dp_rank": 0, "num_reqs": load.running + load.waiting,
                                              "num_tokens": load.queued_prefill_tokens,
                                              "num_total_tokens": load.queued_prefill_tokens}]})

    async def _post(self, request: web.BaseRequest, path: str, body: dict[str, Any]) -> web.StreamResponse:
        b = self.backend
        if path in ("/v1/completions", "/v1/chat/completions"):
            return await self._completions(request, body, chat=path == "/v1/chat/completions")
        if path == "/tokenize":
            ids = prompt_ids(body, chat="messages" in body, tokenizer=b.tokenizer)
            return json_response(200, {"count": len(ids), "max_model_len": b.engine.max_model_len, "tokens": ids,
                                       "token_strs": None})
        if path == "/detokenize":
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, int) and t >= 0 for t in tokens):
                raise bad_request("'tokens' must be a list of non-negative integers")
            try:
                text = b.tokenizer.decode(tokens)
            except ValueError as exc:  # an id outside the vocabulary (vLLM: 400 as well)
                raise bad_request(str(exc)) from None
            return json_response(200, {"prompt": text})
        if path in ("/reset_prefix_cache", "/flush_cache"):
            # vLLM: ?reset_running_requests=true preempts running requests so the reset succeeds.
            preempt = request.query.get("reset_running_requests", "").lower() == "true"
            ok = await self.on_loop(lambda: b.reset_prefix_cache(preempt))
            return json_response(200 if ok else 409, {"success": ok})
        if path == "/kvr/faults":  # event-plane fault rates from now on ({} = none)
            from bus.publisher import FaultPlan

            try:
                plan = FaultPlan(**{k: float(v) for k, v in body.items()}) if body else None
            except (TypeError, ValueError) as exc:
                raise bad_request(f"bad fault plan: {exc}") from None
            await self.on_loop(lambda: b.set_faults(plan))
            return json_response(200, {"success": True})
        await self.on_loop(b.restart_publisher)  # /kvr/restart_publisher
        return json_response(200, {"success": True})

    # ------------------------------------------------------------------ generation

    def _model_card(self) -> dict[str, Any]:
        name = self.backend.config.model
        return {"id": name, "object": "model", "created": self.created, "owned_by": "kvr", "root": name,
                "parent": None, "max_model_len": self.backend.engine.max_model_len, "permission": []}

    def _lora_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "kvr", "root": f"/lora/{name}",
                "parent": self.backend.config.model, "max_model_len": self.backend.engine.max_model_len,
                "permission": []}

    async def _completions(self, request: web.BaseRequest, body: dict[str, Any], *, chat: bool) -> web.StreamResponse:
        parsed = parse_completion_body(body, chat=chat)
        ids, max_tokens, salt = _dispatch_fields(parsed, self.backend.tokenizer)
        rank = request.headers.get("X-data-parallel-rank")  # vLLM's header; otherwise any rank (-1)
        try:
            dp_rank = -1 if rank is None else int(rank)
        except ValueError:
            raise bad_request("X-data-parallel-rank must be an integer") from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        lora = parsed.model if parsed.model in self.backend.config.lora_modules else None
        inbox: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def sink(msg) -> None:  # on the worker loop thread
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, msg)
            except RuntimeError:  # this server's loop is closed: nobody waits
                pass

        self.service.submit_local(Dispatch(request_id=rid, token_ids=ids, max_tokens=max_tokens, dp_rank=dp_rank,
                                           lora_name=lora, cache_salt=salt), sink)
        ended = False
        try:
            first = await self._next(inbox)
            if isinstance(first, ErrorReply):
                ended = True
                raise HttpError(VLLM_STATUS_FOR_CODE.get(first.code, 500), first.message, first.code.value)
            ctx = _Response(rid=rid, model=parsed.model or self.backend.config.model, chat=chat, prompt_ids=ids,
                            return_token_ids=parsed.return_token_ids)
            # x-kvr-worker (as kvr's front sends): a peer router passes it through, so a client
            # sees which worker the router chose (bench/peer_agreement.py).
            extra = {"x-request-id": request.headers.get("x-request-id") or rid,
                     "x-kvr-worker": self.service.worker_id}
            if parsed.stream:
                resp = await self._stream(request, inbox, first, ctx, parsed.include_usage, extra)
            else:
                resp = await self._collect(inbox, first, ctx, extra)
            ended = True
            return resp
        finally:
            if not ended:  # the client left, a timeout, or a write failed: abort, as vLLM does
                self.service.cancel_local(rid)

    async def _next(self, inbox: asyncio.Queue):
        try:
            # Not asyncio.wait_for: on Python 3.11 it can swallow the cancellation aiohttp sends when
            # the client leaves, if it lands as the queue yields an item (gh-86296); the request would
            # then run to its end instead of being aborted (router/http_front.py, the same fix).
            async with asyncio.timeout(self.request_timeout_s):
                msg = await inbox.get()
        except TimeoutError:
            raise HttpError(504, "request timed out", "TimeoutError") from None
        if msg is None:
            raise HttpError(503, "the worker is shutting down", "ServiceUnavailableError")
        return msg

    async def _collect(self, inbox: asyncio.Queue, msg, ctx: _Response, extra: dict[str, str]) -> web.StreamResponse:
        tokens: list[int] = []
        texts: list[str] = []
        while not isinstance(msg, (Completion, ErrorReply)):
            if isinstance(msg, TokenChunk):
                tokens.extend(msg.token_ids)
                texts.append(msg.text)
            msg = await self._next(inbox)
        if isinstance(msg, ErrorReply):
            raise HttpError(VLLM_STATUS_FOR_CODE.get(msg.code, 500), msg.message, msg.code.value)
        return json_response(200, ctx.full("".join(texts), tokens, msg), extra)

    async def _stream(self, request: web.BaseRequest, inbox: asyncio.Queue, msg, ctx: _Response,
                      include_usage: bool, extra: dict[str, str]) -> web.StreamResponse:
        # No length: aiohttp frames it chunked for HTTP/1.1 and close-delimited for HTTP/1.0.
        resp = web.StreamResponse(status=200, headers={"Content-Type": SSE_CONTENT_TYPE, "Cache-Control": "no-cache",
                                                       **extra})
        await resp.prepare(request)
        if ctx.chat:
            await resp.write(sse_event(ctx.chunk({"role": "assistant", "content": ""}, None)))
        try:
            while not isinstance(msg, (Completion, ErrorReply)):
                if isinstance(msg, TokenChunk):
                    await resp.write(sse_event(ctx.chunk(msg.text, None, msg.token_ids)))
                msg = await self._next(inbox)
        except HttpError as exc:  # timed out, or the worker stops: the stream says so and ends
            self.service.cancel_local(ctx.rid)
            await resp.write(sse_error(str(exc), exc.kind, exc.status))
            await resp.write(SSE_DONE)
            await resp.write_eof()
            return resp
        if isinstance(msg, ErrorReply):
            await resp.write(sse_error(msg.message, msg.code.value))
        else:
            await resp.write(sse_event(ctx.chunk("" if not ctx.chat else {}, msg.finish_reason)))
            if include_usage:
                await resp.write(sse_event({**ctx.head(), "choices": [], "usage": ctx.usage(msg)}))
        await resp.write(SSE_DONE)
        await resp.write_eof()
        return resp


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
        return usage_body(prompt_tokens=done.prompt_tokens, completion_tokens=done.output_tokens,
                          cached_tokens=done.cached_tokens)

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
