"""A small blocking client for a vLLM server's HTTP API (stdlib ``http.client`` only).

What the vLLM adapter needs, and nothing else:

* ``POST /v1/completions`` with the prompt as **token ids** (the router has tokenized
  it), ``stream: true`` and ``stream_options: {"include_usage": true}``: the stream is
  Server-Sent Events, one ``data: {json}`` per chunk, ``data: [DONE]`` at the end;
  the usage chunk (``choices: []``) carries ``usage.prompt_tokens_details.cached_tokens``
  (vLLM fills it only with ``--enable-prompt-tokens-details``; ``None`` otherwise);
* ``return_token_ids: true`` so each chunk's choice carries its ``token_ids`` (vLLM
  >= 0.10.2; older servers send text only and the chunk's ids are empty);
* ``GET /v1/models``, ``POST /tokenize``, ``POST /detokenize``, ``GET /metrics``, ``GET /health``.

One HTTP connection per call. A :class:`CompletionStream` can be closed from another
thread (cancellation): the socket is shut down, the reader sees end-of-stream, and
vLLM aborts a request whose client went away.

Errors: everything that goes wrong talking to the server raises :class:`VllmHTTPError`
with the HTTP status (0 when there was no response) and the server's message.
"""

from __future__ import annotations

import http.client
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from worker.vllm.openai_stream import (
    CompletionDelta,
    CompletionStream,
    Usage,
    VllmHTTPError,
    first_choice,
    int_list,
    parse_usage,
)

__all__ = [
    "CompletionDelta", "CompletionRequest", "CompletionResult", "CompletionStream", "ModelCard", "OpenAIClient",
    "Usage", "VllmHTTPError", "parse_usage",
]

logger = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 5.0
#: Longest silence tolerated inside a stream (a long prefill before the first token counts).
DEFAULT_READ_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ModelCard:
    """One entry of ``/v1/models``: the served model, or a LoRA adapter (``parent`` set)."""

    id: str
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


@dataclass(frozen=True)
class CompletionRequest:
    """A completion on token ids. ``model`` is the served model name or a LoRA adapter name."""

    model: str
    prompt_token_ids: Sequence[int]
    max_tokens: int | None  # None: not sent (vLLM's default for the endpoint applies)
    cache_salt: str | None = None
    ignore_eos: bool = False
    temperature: float | None = None
    #: Sent as vLLM's ``X-data-parallel-rank`` header (pins the request to one DP engine).
    data_parallel_rank: int | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        return {} if self.data_parallel_rank is None else {"X-data-parallel-rank": str(self.data_parallel_rank)}

    def body(self, *, stream: bool) -> dict[str, Any]:
        """The JSON body vLLM's ``/v1/completions`` takes."""
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": list(self.prompt_token_ids),
            "stream": stream,
            "return_token_ids": True,
        }
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.cache_salt is not None:
            body["cache_salt"] = self.cache_salt
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.temperature is not None:
            body["temperature"] = self.temperature
        body.update(self.extra_body)
        return body


@dataclass(frozen=True)
class CompletionResult:
    """A whole (non-streamed) completion."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    usage: Usage | None


def _error_message(body: bytes) -> str:
    """vLLM's error body: ``{"object":"error","message":...}`` or ``{"error":{"message":...}}``."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body[:500].decode("utf-8", "replace")
    if isinstance(obj, dict):
        if isinstance(obj.get("error"), dict) and "message" in obj["error"]:
            return str(obj["error"]["message"])
        if "message" in obj:
            return str(obj["message"])
        if "detail" in obj:
            return str(obj["detail"])
    return body[:500].decode("utf-8", "replace")


class OpenAIClient:
    """Blocking client for one vLLM server (``base_url`` like ``http://host:8000``)."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None = None,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"vLLM URL must be http(s)://host[:port], got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._api_key = api_key
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s

    # ------------------------------------------------------------------ plumbing

    def _connect(self, timeout_s: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.connect_timeout_s)
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise VllmHTTPError(f"cannot connect to {self.base_url}: {exc}") from None
        conn.sock.settimeout(timeout_s)
        return conn

    def _headers(self, has_body: bool) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if has_body:
            headers["Content-Type"] = "application/json"
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _open(self, method: str, path: str, body: Any, timeout_s: float, extra_headers: dict[str, str] | None = None):
        conn = self._connect(timeout_s)
        payload = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = self._headers(payload is not None)
        headers.update(extra_headers or {})
        try:
            conn.request(method, self._prefix + path, body=payload, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise VllmHTTPError(f"{method} {path} failed: {exc}") from None
        if response.status >= 400:
            try:
                message = _error_message(response.read())
            except (OSError, http.client.HTTPException):
                message = response.reason
            finally:
                conn.close()
            raise VllmHTTPError(f"{method} {path}: HTTP {response.status}: {message}", status=response.status)
        return conn, response

    def _call(self, method: str, path: str, body: Any = None, *, timeout_s: float | None = None,
              extra_headers: dict[str, str] | None = None) -> bytes:
        conn, response = self._open(method, path, body, timeout_s or self.connect_timeout_s, extra_headers)
        try:
            return response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise VllmHTTPError(f"{method} {path}: reading the reply failed: {exc}") from None
        finally:
            conn.close()

    def _json(self, method: str, path: str, body: Any = None, *, timeout_s: float | None = None,
              extra_headers: dict[str, str] | None = None) -> Any:
        raw = self._call(method, path, body, timeout_s=timeout_s, extra_headers=extra_headers)
        try:
            return json.loads(raw)
        except ValueError:
            raise VllmHTTPError(f"{method} {path}: reply is not JSON: {raw[:200]!r}") from None

    # ------------------------------------------------------------------ API

    def health(self) -> bool:
        """``GET /health`` answered 2xx."""
        try:
            self._call("GET", "/health")
        except VllmHTTPError:
            return False
        return True

    def models(self) -> list[ModelCard]:
        """``GET /v1/models``: the served model(s) and loaded LoRA adapters."""
        obj = self._json("GET", "/v1/models")
        data = obj.get("data") if isinstance(obj, dict) else None
        if not isinstance(data, list):
            raise VllmHTTPError(f"GET /v1/models: unexpected reply {str(obj)[:200]}")
        cards = []
        for item in data:
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                max_len = item.get("max_model_len")
                cards.append(ModelCard(id=item["id"], root=item.get("root"), parent=item.get("parent"),
                                       max_model_len=max_len if isinstance(max_len, int) else None))
        return cards

    def tokenize(self, text: str, *, model: str, add_special_tokens: bool = True) -> list[int]:
        """``POST /tokenize`` → token ids, exactly as the server tokenizes a completion prompt."""
        obj = self._json("POST", "/tokenize", {"model": model, "prompt": text,
                                               "add_special_tokens": add_special_tokens})
        tokens = obj.get("tokens") if isinstance(obj, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise VllmHTTPError(f"POST /tokenize: unexpected reply {str(obj)[:200]}")
        return tokens

    def detokenize(self, token_ids: Sequence[int], *, model: str) -> str:
        """``POST /detokenize`` → text."""
        obj = self._json("POST", "/detokenize", {"model": model, "tokens": list(token_ids)})
        text = obj.get("prompt") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise VllmHTTPError(f"POST /detokenize: unexpected reply {str(obj)[:200]}")
        return text

    def metrics_text(self) -> str:
        """``GET /metrics``: Prometheus text exposition."""
        return self._call("GET", "/metrics").decode("utf-8", "replace")

    def stream_completion(self, request: CompletionRequest) -> CompletionStream:
        """Start a streamed completion; raises :class:`VllmHTTPError` if the server refuses it."""
        conn, response = self._open("POST", "/v1/completions", request.body(stream=True), self.read_timeout_s,
                                    request.headers())
        return CompletionStream(conn, response)

    def complete(self, request: CompletionRequest) -> CompletionResult:
        """A whole completion in one reply (``stream: false``)."""
        obj = self._json("POST", "/v1/completions", request.body(stream=False), timeout_s=self.read_timeout_s,
                         extra_headers=request.headers())
        if not isinstance(obj, dict):
            raise VllmHTTPError(f"POST /v1/completions: unexpected reply {str(obj)[:200]}")
        choice = first_choice(obj)
        if choice is None:
            raise VllmHTTPError(f"POST /v1/completions: no choices in {str(obj)[:200]}")
        return CompletionResult(
            token_ids=int_list(choice.get("token_ids")),
            text=str(choice.get("text") or ""),
            finish_reason=choice.get("finish_reason"),
            usage=parse_usage(obj.get("usage")),
        )
