"""The OpenAI HTTP API as both of kvr's HTTP edges speak it: request bodies, error bodies, SSE framing
and the status of each ``ErrorCode``.

Two servers speak it: the router's front (``router/http_front.py``) and the emulated worker's vLLM
face (``worker/http_api.py``). They decode a completions body with the one function here, so they
accept and refuse the same bodies with the same answers (tests/worker/test_http_same_answers.py runs
one table of bodies against both). Where the two could differ, vLLM decides:

* ``max_tokens`` (or ``max_completion_tokens``) absent: 16 on ``/v1/completions``
  (:data:`DEFAULT_COMPLETION_MAX_TOKENS`, vLLM's ``CompletionRequest`` default) and no cap on
  ``/v1/chat/completions`` (``None``: vLLM generates until the model stops or the context is full,
  ``max_model_len`` minus the prompt). Given: an integer ≥ 1 (vLLM refuses 0 as well).
* ``messages``: a non-empty list of objects (vLLM refuses an empty conversation with a 400).

No I/O here and no import of router/ or worker/: both import this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec

from bus.schema import ErrorCode
from core.tokenizer import apply_chat_template

#: vLLM's ``max_tokens`` default for ``/v1/completions`` (chat has none: see the module docstring).
DEFAULT_COMPLETION_MAX_TOKENS = 16
#: Largest request body either server reads; a bigger one is answered 413 without being read.
MAX_BODY_BYTES = 64 * 1024 * 1024
#: kvr hashes token ids as uint32 (core/own_block_hash.py); the router and the engine refuse the rest too.
MAX_TOKEN_ID = 2**32
#: What msgpack carries as a signed int: a bigger ``max_tokens`` could not cross the client channel.
MAX_WIRE_INT = 2**63
#: Content type of a streamed answer; each event is :func:`sse_event`, the stream ends with :data:`SSE_DONE`.
SSE_CONTENT_TYPE = "text/event-stream"
SSE_DONE = b"data: [DONE]\n\n"

#: kvr's status for each way a request can end without a result (the router front's answers).
STATUS_FOR_CODE: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400, ErrorCode.PROMPT_TOO_LONG: 413, ErrorCode.UNKNOWN_MODEL: 404,
    ErrorCode.NO_WORKERS: 503, ErrorCode.OVERLOADED: 429, ErrorCode.TIMEOUT: 504, ErrorCode.CANCELLED: 499,
    ErrorCode.WORKER_DIED: 502, ErrorCode.WORKER_ERROR: 502, ErrorCode.ROUTER_RESTARTED: 503,
    ErrorCode.INTERNAL: 500,
}  # fmt: skip
#: The emulated worker imitates vLLM itself: a prompt over ``max_model_len`` is a 400 there, and an
#: engine failure is the server's own (503), not a bad gateway's.
VLLM_STATUS_FOR_CODE: dict[ErrorCode, int] = {
    **STATUS_FOR_CODE, ErrorCode.PROMPT_TOO_LONG: 400, ErrorCode.WORKER_ERROR: 503,
}  # fmt: skip
#: ``Retry-After`` (seconds) of a 429 or 503 that says "busy, come back".
RETRY_AFTER_S = 1


class HttpError(Exception):
    """An answer other than 200: ``status``, a message and the error ``kind`` (its JSON ``type``)."""

    def __init__(self, status: int, message: str, kind: str = ErrorCode.BAD_REQUEST.value,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, dict(headers or {})


def bad_request(message: str) -> HttpError:
    return HttpError(400, message, ErrorCode.BAD_REQUEST.value)


def error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    """OpenAI's error object; ``code`` repeats the HTTP status (vLLM does the same)."""
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def retry_headers(status: int) -> dict[str, str]:
    """``Retry-After`` for the statuses that mean "try again shortly" (429, 503), else none."""
    return {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else {}


def method_not_allowed(method: str, path: str, allowed: list[str]) -> HttpError:
    return HttpError(405, f"method {method} not allowed on {path}", "MethodNotAllowedError",
                     {"Allow": ", ".join(allowed)})


def no_route(method: str, path: str, *, get_paths: frozenset[str], post_paths: frozenset[str]) -> HttpError:
    """405 with ``Allow`` for a path served under another method, else 404."""
    allowed = [m for m, paths in (("GET", get_paths), ("POST", post_paths)) if path in paths]
    if allowed:
        return method_not_allowed(method, path, allowed)
    return HttpError(404, f"no route {path}", "NotFoundError")


_json_encode = msgspec.json.Encoder().encode


def sse_event(obj: Any) -> bytes:
    """One Server-Sent Event carrying ``obj`` as compact UTF-8 JSON (msgspec: ~10× ``json.dumps``,
    and this runs once per streamed token)."""
    return b"data: " + _json_encode(obj) + b"\n\n"


def sse_error(message: str, kind: str, status: int = 500) -> bytes:
    """The event that ends a stream that failed after its 200 was sent (vLLM's shape)."""
    return sse_event(error_body(status, message, kind))


def usage_body(*, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def decode_json_body(raw: bytes) -> dict[str, Any]:
    """A request body → its JSON object, or a 400 (an empty body is ``{}``)."""
    raw = raw or b"{}"
    try:
        # msgspec: a 1,024-token prompt's int list decodes several times faster than with json.loads
        # (which was ~9 % of the router's CPU per HTTP request).
        body = msgspec.json.decode(raw)
    except (msgspec.DecodeError, ValueError, UnicodeDecodeError, RecursionError):
        # msgspec is stricter (NaN, 1e400, a lone surrogate) and its messages are about bytes: the
        # standard library then decides, as it always did, and says what is wrong.
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: "[[[[..." nesting
            raise bad_request(f"invalid JSON: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


@dataclass(frozen=True)
class CompletionBody:
    """A valid ``/v1/completions`` or ``/v1/chat/completions`` body. Exactly one of ``prompt``
    (text; a chat's conversation with its template applied) and ``token_ids``."""

    prompt: str | None
    token_ids: list[int] | None
    max_tokens: int | None  # None: no cap (a chat without max_tokens; see the module docstring)
    model: str | None
    cache_salt: str | None
    stream: bool
    include_usage: bool
    return_token_ids: bool


def _all_ints(values: list[Any]) -> bool:
    """Every item an int and none a bool. The types are collected in C first (what a JSON decoder
    gives: exactly ``int``); only a list holding something else is walked in Python, so that an int
    subclass other than bool still counts."""
    types = set(map(type, values))
    if types <= {int}:
        return True
    return all(isinstance(t, int) and not isinstance(t, bool) for t in values)


def parse_prompt(body: dict[str, Any], *, chat: bool) -> tuple[str | None, list[int] | None]:
    """``(text, token ids)`` of a body's prompt, one of them ``None``: a chat's ``messages`` with the
    chat template applied, or ``prompt`` (a string, token ids, or a batch of one); else a 400."""
    prompt, token_ids = None, None
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise bad_request("'messages' must be a non-empty list of objects")
        add_generation_prompt = body.get("add_generation_prompt", True) is not False
        prompt = apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            prompt = p
        elif isinstance(p, list) and _all_ints(p):
            if p and (min(p) < 0 or max(p) >= MAX_TOKEN_ID):
                bad = next(t for t in p if not 0 <= t < MAX_TOKEN_ID)
                raise bad_request(f"token id {bad} is outside [0, {MAX_TOKEN_ID})")
            token_ids = p  # empty: the router's or the engine's "empty prompt" answer
        else:
            raise bad_request("'prompt' must be a string or a list of token ids (batches are not supported)")
    if prompt is not None:
        try:
            prompt.encode("utf-8")  # JSON's "\ud800" is a lone surrogate: no UTF-8, no tokenizer, no msgpack
        except UnicodeEncodeError as exc:
            raise bad_request(f"the request does not encode: {str(exc)[:200]}") from None
    return prompt, token_ids


def parse_completion_body(body: dict[str, Any], *, chat: bool) -> CompletionBody:
    """A decoded completions body → :class:`CompletionBody`, or a 400 saying what is wrong.

    Only what no engine or router needs to judge is checked: shapes and types, token ids in
    uint32, numbers msgpack carries, text that is valid Unicode. Limits (prompt length, the largest
    ``max_tokens``, the served models) are the router's or the engine's.
    """
    prompt, token_ids = parse_prompt(body, chat=chat)
    if body.get("n", 1) != 1:
        raise bad_request("only n=1 is supported")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = None if chat else DEFAULT_COMPLETION_MAX_TOKENS
    elif not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise bad_request("'max_tokens' must be a positive integer")
    elif max_tokens >= MAX_WIRE_INT:
        raise bad_request(f"'max_tokens' {max_tokens} is too large")
    salt = body.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise bad_request("'cache_salt' must be a string")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object")
    for text in (salt, model):
        try:
            if text is not None:
                text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise bad_request(f"the request does not encode: {str(exc)[:200]}") from None
    return CompletionBody(prompt=prompt, token_ids=token_ids, max_tokens=max_tokens, model=model, cache_salt=salt,
                          stream=bool(body.get("stream")), include_usage=bool((options or {}).get("include_usage")),
                          return_token_ids=bool(body.get("return_token_ids")))
