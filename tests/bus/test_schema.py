"""kvr's own wire schema: every message round-trips on its channel, and only there."""

from __future__ import annotations

import msgspec
import pytest

from bus.codec import (
    ChannelDecoder,
    DecodeError,
    client_decoder,
    encode,
    metrics_decoder,
    reply_decoder,
    router_decoder,
    worker_decoder,
)
from bus.schema import (
    Cancel,
    CancelRequest,
    Completion,
    Dispatch,
    ErrorCode,
    ErrorReply,
    GenerateRequest,
    Goodbye,
    Heartbeat,
    Hello,
    Refused,
    RequestRecord,
    RequestStats,
    Routed,
    TokenChunk,
    Welcome,
    WorkerLoad,
    WorkerSample,
)

CHANNELS = {
    "client": (client_decoder, [GenerateRequest("r1", prompt="hello", max_tokens=4), CancelRequest("r1")]),
    "reply": (
        reply_decoder,
        [
            Routed("r1", "w1", 0, 3, 48, "kvr", "ttft"),
            TokenChunk("r1", [1, 2]),
            Completion("r1", "w1", 100, 48, 4, stats=RequestStats(ttft_s=0.1)),
            ErrorReply("r1", ErrorCode.NO_WORKERS, "no worker serves model m"),
        ],
    ),
    "worker": (
        worker_decoder,
        [
            Hello("w1", 1, "m", 16, 924, "tcp://127.0.0.1:1"),
            Heartbeat("w1", 1, WorkerLoad(running=2, kv_usage=0.5)),
            Goodbye("w1", 1),
            TokenChunk("r1", [5]),
            Completion("r1", "w1", 1, 0, 1),
            ErrorReply("r1", ErrorCode.WORKER_ERROR, "x", "w1"),
        ],
    ),
    "router": (
        router_decoder,
        [Welcome("router", 1.0, 3), Refused("bad block size"), Heartbeat("router"), Dispatch("r1", [1, 2], 3),
         Cancel("r1")],
    ),
    "metrics": (
        metrics_decoder,
        [
            RequestRecord(request_id="r1", worker_id="w1", arrival_s=1.0, ttft_s=0.1, e2e_s=1.0, prompt_tokens=100,
                          cached_tokens=48, output_tokens=4, predicted_cached_tokens=48, policy="kvr"),
            WorkerSample("w1", 1.0, WorkerLoad()),
        ],
    ),
}


@pytest.mark.parametrize("channel", CHANNELS)
def test_every_message_round_trips_on_its_channel(channel: str) -> None:
    make, messages = CHANNELS[channel]
    decoder = make()
    for message in messages:
        assert decoder.decode(encode(message)) == message


def test_a_message_on_the_wrong_channel_is_a_decode_error() -> None:
    decoder = client_decoder()
    with pytest.raises(DecodeError, match="Invalid value 'hello'"):
        decoder.decode(encode(Hello("w1", 1, "m", 16, 924, "tcp://x:1")))
    assert decoder.errors == 1


def test_oversize_frames_are_refused_before_decoding() -> None:
    decoder = ChannelDecoder(GenerateRequest, max_bytes=64)
    with pytest.raises(DecodeError, match="exceeds the 64-byte limit"):
        decoder.decode(encode(GenerateRequest("r", token_ids=list(range(100)))))


def test_wire_tag_is_stable() -> None:
    # The tag values are the protocol: pin one encoding byte for byte.
    assert encode(CancelRequest("r1")) == msgspec.msgpack.encode({"type": "cancel", "request_id": "r1"})


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_DECODERS = [client_decoder, reply_decoder, worker_decoder, router_decoder, metrics_decoder]
_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300)
@given(st.binary(max_size=256))
def test_fuzz_random_bytes_raise_only_decode_error(data: bytes) -> None:
    for make in _DECODERS:
        try:
            make().decode(data)
        except DecodeError:
            pass


@settings(max_examples=300)
@given(
    st.sampled_from(["generate", "cancel", "routed", "tokens", "done", "error", "hello", "heartbeat", "dispatch", "x"]),
    st.dictionaries(st.sampled_from(["request_id", "token_ids", "max_tokens", "prompt", "worker_id", "epoch", "load"]),
                    _msgpack_values, max_size=5),
)
def test_fuzz_well_formed_maps_with_wrong_fields_raise_only_decode_error(tag: str, fields: dict) -> None:
    data = msgspec.msgpack.encode({"type": tag, **fields})
    for make in _DECODERS:
        try:
            make().decode(data)
        except DecodeError:
            pass
