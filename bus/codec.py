"""One typed decoder per channel of ``bus/schema.py``, one ``DecodeError``.

Size limits are enforced before decoding so an oversized frame costs nothing.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import msgspec

from bus.schema import ClientMessage, MetricsRecord, PeerLoad, ReplyMessage, RouterMessage, WorkerMessage
from bus.vllm_codec import DecodeError

__all__ = [
    "DecodeError", "ChannelDecoder", "encode", "MAX_MESSAGE_BYTES",
    "client_decoder", "reply_decoder", "worker_decoder", "router_decoder", "metrics_decoder", "peer_decoder",
    "salvage_request_id",
]

#: Largest message any kvr channel accepts (a 128k-token prompt as token ids is ~0.7 MB).
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

T = TypeVar("T")
_encoder = msgspec.msgpack.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    """Encode any schema message."""
    return _encoder.encode(message)


class ChannelDecoder(Generic[T]):
    """Decode frames of one channel into its union type, counting failures."""

    def __init__(self, message_type: type[T] | object, *, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        # A union alias is not a type[T], so msgspec's stubs make this a Decoder[Any]; the
        # annotation records what it decodes.
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(message_type)
        self._max_bytes = max_bytes
        self.errors = 0

    def decode(self, frame: bytes) -> T:
        if len(frame) > self._max_bytes:
            self.errors += 1
            raise DecodeError(f"message of {len(frame)} bytes exceeds the {self._max_bytes}-byte limit")
        try:
            return self._decoder.decode(frame)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            # msgspec raises UnicodeDecodeError (not DecodeError) for a string that is not UTF-8 and
            # RecursionError for deep nesting: both are bad frames, and must not escape as such.
            self.errors += 1
            raise DecodeError(f"{type(exc).__name__}: {exc}" if not isinstance(exc, msgspec.DecodeError)
                              else str(exc)) from None


class _Envelope(msgspec.Struct):
    """Just enough of a client message to answer it: the tag and the id (other fields ignored)."""

    type: str
    request_id: str


_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)


def salvage_request_id(frame: bytes, *, max_chars: int = 256) -> str | None:
    """The ``request_id`` of a ``GenerateRequest`` that failed to decode (a field of the wrong
    type, say), so the router can answer it with an error instead of leaving the client waiting;
    ``None`` when the frame is not even that (then nobody can be told)."""
    if len(frame) > MAX_MESSAGE_BYTES:
        return None
    try:
        env = _envelope_decoder.decode(frame)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    if env.type != "generate" or not 0 < len(env.request_id) <= max_chars:
        return None
    return env.request_id


def client_decoder() -> ChannelDecoder[ClientMessage]:
    """Router side of the client channel."""
    return ChannelDecoder(ClientMessage)


def reply_decoder() -> ChannelDecoder[ReplyMessage]:
    """Client side of the client channel."""
    return ChannelDecoder(ReplyMessage)


def worker_decoder() -> ChannelDecoder[WorkerMessage]:
    """Router side of the worker channel."""
    return ChannelDecoder(WorkerMessage)


def router_decoder() -> ChannelDecoder[RouterMessage]:
    """Worker side of the worker channel."""
    return ChannelDecoder(RouterMessage)


def metrics_decoder() -> ChannelDecoder[MetricsRecord]:
    return ChannelDecoder(MetricsRecord)


def peer_decoder() -> ChannelDecoder[PeerLoad]:
    """What a router replica reads from the others (``router/peers.py``)."""
    return ChannelDecoder(PeerLoad)
