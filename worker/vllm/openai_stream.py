"""Server-Sent Events of vLLM's streamed ``/v1/completions``, read from an ``http.client`` response.

One ``data: {json}`` per chunk, ``data: [DONE]`` at the end; the usage chunk (``choices: []``)
carries ``usage.prompt_tokens_details.cached_tokens`` (``None`` when the server does not fill
it). Comments, ``event:``/``id:`` fields and blank separators are skipped; a malformed data
line is skipped and counted; an error object in the stream raises :class:`VllmHTTPError`.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


class VllmHTTPError(RuntimeError):
    """A failed call to the vLLM server. ``status`` is 0 when no HTTP response came back."""

    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Usage:
    """``usage`` of a completion. ``cached_tokens`` is ``None`` when the server did not report it."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None


@dataclass(frozen=True)
class CompletionDelta:
    """One streamed chunk of choice 0 (a usage-only chunk is not a delta)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None


def parse_usage(obj: Any) -> Usage | None:
    """``usage`` JSON → :class:`Usage` (``None`` if absent or malformed)."""
    if not isinstance(obj, dict):
        return None
    try:
        details = obj.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        return Usage(
            prompt_tokens=int(obj.get("prompt_tokens", 0)),
            completion_tokens=int(obj.get("completion_tokens", 0)),
            cached_tokens=None if cached is None else int(cached),
        )
    except (TypeError, ValueError):
        return None


def _stream_error(obj: dict) -> tuple[str, int] | None:
    """(message, code) of an error object in a stream: ``{"object":"error",...}`` or ``{"error":{...}}``."""
    if obj.get("object") == "error":
        err = obj
    elif obj.get("error") is not None:
        err = obj["error"] if isinstance(obj["error"], dict) else {"message": obj["error"]}
    else:
        return None
    code = err.get("code")
    return str(err.get("message", err)), code if isinstance(code, int) else 0


def first_choice(obj: dict) -> dict | None:
    """Choice 0 of a completion object, if any."""
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return None


def int_list(value: Any) -> list[int]:
    """``value`` if it is a list of ints, else ``[]``."""
    if isinstance(value, list) and all(isinstance(t, int) for t in value):
        return value
    return []


class CompletionStream:
    """An open streamed completion: iterate for :class:`CompletionDelta`, then read :attr:`usage`.

    Iteration ends at ``data: [DONE]`` or when the server closes the stream. A malformed
    SSE line is skipped and counted in :attr:`malformed_lines`; an error object in the
    stream raises :class:`VllmHTTPError`.
    """

    def __init__(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        self._conn = conn
        self._response = response
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._reading = False
        self.usage: Usage | None = None
        self.done = False  # saw data: [DONE]
        self.malformed_lines = 0

    def __iter__(self) -> Iterator[CompletionDelta]:
        with self._lock:
            self._reading = True
        try:
            yield from self._read()
        finally:
            with self._lock:
                self._reading = False
            self._closed.set()
            self._conn.close()  # only the reading thread closes the response it reads from

    def _read(self) -> Iterator[CompletionDelta]:
        while not self._closed.is_set():
            try:
                raw = self._response.readline()
            except (OSError, http.client.HTTPException, ValueError, AttributeError) as exc:
                if self._closed.is_set():
                    return  # closed by close(): a cancellation, not an error
                raise VllmHTTPError(f"stream broken: {exc}") from None
            if not raw:
                return
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments (": ping"), event: / id: fields
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                self._drain_rest()
                return
            try:
                obj = json.loads(data)
            except ValueError:
                self.malformed_lines += 1
                logger.warning("malformed SSE data line skipped: %r", data[:200])
                continue
            if not isinstance(obj, dict):
                self.malformed_lines += 1
                continue
            error = _stream_error(obj)
            if error is not None:
                raise VllmHTTPError(f"server error in stream: {error[0]}", status=error[1])
            usage = parse_usage(obj.get("usage"))
            if usage is not None:
                self.usage = usage
            choice = first_choice(obj)
            if choice is None:
                continue
            yield CompletionDelta(
                token_ids=int_list(choice.get("token_ids")),
                text=str(choice.get("text") or ""),
                finish_reason=choice.get("finish_reason"),
            )

    def _drain_rest(self) -> None:
        # Read the stream's end (the last chunk): closing with unread bytes would send a TCP reset.
        try:
            self._response.read()
        except (OSError, http.client.HTTPException, ValueError, AttributeError):
            pass

    def close(self) -> None:
        """Stop reading and drop the connection (safe from any thread, idempotent)."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            reading = self._reading
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # unblocks a reader in another thread
            except OSError:
                pass
        if not reading:
            self._conn.close()
