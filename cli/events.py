"""``kvr events``: watch, publish and demo vLLM KV-event streams.

* ``kvr events listen ENDPOINT``: decode a live stream (a real vLLM's or kvr's) and
  print every batch; gaps are repaired by replay when ``--replay-endpoint`` is given.
  Exit status: 0 when ``--count`` batches were printed, or on ``--timeout`` / Ctrl-C
  when no ``--count`` was asked for; 1 when ``--timeout`` hit before ``--count``.
* ``kvr events publish``: a vLLM-compatible publisher of synthetic batches, with
  optional drops so a listener shows gap detection and replay.
* ``kvr events demo``: both on loopback for ~10 s, then a summary table.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

MAX_HASHES_SHOWN = 3


def to_jsonable(value: Any) -> Any:
    """bytes → lowercase hex; ints stay exact JSON integers (also >= 2**63)."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    return value


def batch_json(item) -> str:
    """One applied batch as the JSON line ``listen --json`` prints."""
    from core.events import event_to_dict

    batch = item.batch
    return json.dumps({
        "seq": item.seq,
        "ts": batch.ts,
        "dp_rank": batch.data_parallel_rank,
        "topic": item.topic.decode("utf-8", "replace"),
        "replayed": item.replayed,
        "events": [to_jsonable(event_to_dict(e)) for e in batch.events],
    }, separators=(",", ":"))


def _hash_text(h) -> str:
    return h.hex()[-16:] if isinstance(h, bytes) else f"{h:016x}"


def event_line(seq: int, event, *, replayed: bool = False) -> str:
    """One human-readable line per event."""
    from core.events import BlockRemoved, BlockStored

    name = type(event).__name__
    head = f"seq={seq}{' (replayed)' if replayed else ''} {name}"
    if isinstance(event, (BlockStored, BlockRemoved)):
        hashes = event.block_hashes
        shown = " ".join(_hash_text(h) for h in hashes[:MAX_HASHES_SHOWN])
        more = f" +{len(hashes) - MAX_HASHES_SHOWN}" if len(hashes) > MAX_HASHES_SHOWN else ""
        head += f" blocks={len(hashes)} [{shown}{more}] medium={event.medium}"
        if event.group_idx is not None:
            head += f" group={event.group_idx}"
    if isinstance(event, BlockStored):
        parent = "-" if event.parent_block_hash is None else _hash_text(event.parent_block_hash)
        head += f" parent={parent} tokens={len(event.token_ids)} block_size={event.block_size}"
        if event.lora_name:
            head += f" lora={event.lora_name}"
    return head


def _report(item) -> None:
    from bus.subscriber import BadBatch, GapLost, StreamReset

    if isinstance(item, StreamReset):
        click.echo(f"RESET publisher restarted after seq {item.old_seq}: new stream from seq 0", err=True)
    elif isinstance(item, GapLost):
        click.echo(f"LOST batches {item.from_seq}..{item.to_seq} (not recoverable)", err=True)
    elif isinstance(item, BadBatch):
        click.echo(f"BAD seq {item.seq}: {item.reason}", err=True)


@click.group("events")
def events() -> None:
    """vLLM KV-cache event streams: listen to one, publish one, or watch a demo."""


@events.command("listen")
@click.argument("endpoint")
@click.option("--bind", is_flag=True, help="Bind the SUB (vLLM's connect mode: its endpoint is tcp://host:port).")
@click.option("--replay-endpoint", default=None,
              help="vLLM's replay ROUTER, to repair gaps (and replay from 0 on join).")
@click.option("--topic", default="", help="Subscription prefix, as on a ZMQ SUB socket.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per batch (hashes: ints exact, bytes as hex).")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Exit after N batches.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0), default=None,
              help="Exit after S seconds without a batch (status 1 if --count was not reached).")
def listen(endpoint: str, bind: bool, replay_endpoint: str | None, topic: str, as_json: bool, count: int | None,
           timeout_s: float | None) -> None:
    """Print every KV-event batch published on ENDPOINT (e.g. tcp://vllm-host:5557)."""
    from bus.subscriber import AppliedBatch, EventSubscriber
    from cli._events_demo import quiet_subscriber_log

    quiet_subscriber_log()
    try:
        sub = EventSubscriber(endpoint=endpoint, replay_endpoint=replay_endpoint, topic=topic, bind=bind)
    except Exception as exc:  # zmq.ZMQError: bad endpoint, port in use
        raise click.ClickException(f"cannot {'bind' if bind else 'connect'} {endpoint}: {exc}") from None
    printed = 0
    last_batch = time.monotonic()
    seen = {"gaps": 0, "replays": 0}
    status = 0
    try:
        while count is None or printed < count:
            for item in sub.poll(100):
                if isinstance(item, AppliedBatch):
                    printed += 1
                    last_batch = time.monotonic()
                    if as_json:
                        click.echo(batch_json(item))
                    else:
                        for event in item.batch.events:
                            click.echo(event_line(item.seq, event, replayed=item.replayed))
                    if count is not None and printed >= count:
                        break
                else:
                    _report(item)
            for name in seen:  # gaps and replays happen inside the subscriber: say so once each
                now = getattr(sub.counters, name)
                if now > seen[name]:
                    verb = "gap detected" if name == "gaps" else "replay requested"
                    click.echo(f"{verb} (next seq {sub.expected_seq}; {name}={now})", err=True)
                    seen[name] = now
            if timeout_s is not None and time.monotonic() - last_batch > timeout_s:
                status = 0 if count is None else 1
                break
    except KeyboardInterrupt:
        pass
    finally:
        c = sub.counters
        click.echo(f"batches={c.batches} events={c.events} gaps={c.gaps} replays={c.replays} "
                   f"replayed={c.replayed_batches} duplicates={c.duplicates} resets={c.resets} "
                   f"lost={c.lost_batches} decode_errors={c.decode_errors} bad_frames={c.bad_frames}", err=True)
        sub.close()
    sys.exit(status)


@events.command("publish")
@click.option("--endpoint", default="tcp://*:5557", show_default=True, help="PUB endpoint (vLLM's bind/connect rule).")
@click.option("--replay-endpoint", default="tcp://*:5558", show_default=True, help="Replay ROUTER ('' for none).")
@click.option("--topic", default="", help="Topic frame (vLLM's default is empty).")
@click.option("--rate", "rate_hz", type=click.FloatRange(min=0.1), default=10.0, show_default=True, help="Batches/s.")
@click.option("--count", type=click.IntRange(min=0), default=0, show_default=True, help="Batches to send (0: forever).")
@click.option("--drop-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fraction of batches not sent live (still replayable).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--legacy", is_flag=True, help="vLLM <= 0.23: array-encoded events and the old replay layout.")
def publish(endpoint: str, replay_endpoint: str, topic: str, rate_hz: float, count: int, drop_rate: float, seed: int,
            legacy: bool) -> None:
    """Publish synthetic vLLM KV-event batches (chained stores over random prompts, evictions, rare clears)."""
    import random

    from bus.publisher import EventPublisher, FaultPlan
    from bus.synthetic_events import SyntheticKVEvents
    from bus.vllm_codec import encode_batch
    from core.events import KVEventBatch

    rng = random.Random(seed)
    source = SyntheticKVEvents(rng=random.Random(seed + 1))
    try:
        pub = EventPublisher(endpoint=endpoint, replay_endpoint=replay_endpoint or None, topic=topic,
                             reply_format="legacy" if legacy else "0.33",
                             faults=FaultPlan(drop_rate=drop_rate) if drop_rate else None, rng=rng)
    except Exception as exc:  # zmq.ZMQError: bad endpoint, port in use
        raise click.ClickException(f"cannot open {endpoint} / {replay_endpoint}: {exc}") from None
    click.echo(f"publishing on {pub.endpoint} (replay {pub.replay_endpoint}) at {rate_hz:g}/s; Ctrl-C stops", err=True)
    period_s = 1.0 / rate_hz
    next_at = time.monotonic()
    try:
        while count == 0 or pub.next_seq < count:
            events_ = source.next_step()
            batch = KVEventBatch(time.time(), events_, pub.dp_rank)
            pub.publish_raw(encode_batch(batch, legacy=legacy))
            next_at += period_s
            while (left_s := next_at - time.monotonic()) > 0:
                pub.poll_replay(int(left_s * 1000) + 1)
        # Stay up briefly so listeners can still repair their last gaps.
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            pub.poll_replay(50)
    except KeyboardInterrupt:
        pass
    finally:
        c = pub.counters
        click.echo(f"published={c.published} dropped={c.dropped} replay_requests={c.replay_requests} "
                   f"replayed={c.replayed_batches}", err=True)
        pub.close()


@events.command("demo")
@click.option("--duration", "duration_s", type=click.FloatRange(min=1), default=8.0, show_default=True)
@click.option("--rate", "rate_hz", type=click.FloatRange(min=1), default=20.0, show_default=True)
@click.option("--drop-rate", type=click.FloatRange(0, 0.9), default=0.15, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--restart/--no-restart", default=True, show_default=True, help="Restart the publisher midway.")
def demo(duration_s: float, rate_hz: float, drop_rate: float, seed: int, restart: bool) -> None:
    """A publisher with faults and a listener on loopback: every batch arrives exactly once."""
    from cli._events_demo import run_demo

    sys.exit(run_demo(duration_s=duration_s, rate_hz=rate_hz, drop_rate=drop_rate, seed=seed, restart=restart))


COMMANDS = [events]
