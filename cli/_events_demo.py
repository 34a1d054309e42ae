"""``kvr events demo``: a faulty vLLM-compatible publisher and a listener on loopback.

The publisher runs in its own thread (vLLM's model: fed by a queue, serving replay
between batches) and drops, duplicates and reorders live batches; midway it
restarts (seq back to 0, as a restarted vLLM). The listener prints the decoded
stream as it is applied and ends with a table proving nothing was missed and
nothing applied twice. Exit status 0 when that holds.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter

from rich.console import Console
from rich.table import Table

from bus.publisher import FaultPlan
from bus.publisher_thread import PublisherThread
from bus.subscriber import AppliedBatch, BadBatch, EventSubscriber, GapLost, StreamReset
from bus.synthetic_events import SyntheticKVEvents

_SETTLE_S = 3.0


def quiet_subscriber_log() -> None:
    """The command reports gaps and resets itself; the subscriber's log would say it twice."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("bus.subscriber", "bus.event_stream"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _batch_text(item: AppliedBatch) -> str:
    kinds = Counter(type(e).__name__ for e in item.batch.events)
    blocks = sum(len(getattr(e, "block_hashes", ())) for e in item.batch.events)
    parts = []
    for name, style in (("BlockStored", "green"), ("BlockRemoved", "yellow"), ("AllBlocksCleared", "bold red")):
        if kinds[name]:
            parts.append(f"[{style}]{name}[/]" + (f"×{kinds[name]}" if kinds[name] > 1 else ""))
    how = "[cyan]↺ replay[/]" if item.replayed else "[dim]live[/]    "
    return f"seq {item.seq:>4}  {how}  {' '.join(parts)}  [dim]{blocks} blocks[/]"


def run_demo(*, duration_s: float, rate_hz: float, drop_rate: float, seed: int, restart: bool) -> int:
    console = Console(highlight=False)
    quiet_subscriber_log()
    faults = FaultPlan(drop_rate=drop_rate, duplicate_rate=0.05, reorder_rate=0.05)
    pub = PublisherThread(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", bind=True,
                          topic="kv@demo-worker@Qwen/Qwen3-0.6B", faults=faults, rng=random.Random(seed))
    sub = EventSubscriber(endpoint=pub.endpoint, replay_endpoint=pub.replay_endpoint, replay_timeout_ms=500)
    source = SyntheticKVEvents(rng=random.Random(seed + 1), capacity_blocks=512)
    console.print(f"[bold]kvr events demo[/]: publisher {pub.endpoint} (replay {pub.replay_endpoint}), "
                  f"{rate_hz:g} batches/s for {duration_s:g} s, drops {drop_rate:.0%}, duplicates 5%, reorders 5%"
                  + (", one restart midway" if restart else ""))
    published = [0]  # batches per publisher incarnation
    applied: list[Counter] = [Counter()]
    live = replayed = lost = 0
    restarted = not restart

    def handle(items) -> None:
        nonlocal live, replayed, lost
        for item in items:
            if isinstance(item, AppliedBatch):
                applied[-1][item.seq] += 1
                replayed += item.replayed
                live += not item.replayed
                console.print(_batch_text(item))
            elif isinstance(item, StreamReset):
                applied.append(Counter())
                console.print(f"[bold red]⟲ stream reset[/]: publisher restarted after seq {item.old_seq}; "
                              "router would drop this worker's blocks and follow the new stream")
            elif isinstance(item, GapLost):
                lost += item.to_seq - item.from_seq + 1
                console.print(f"[bold red]lost {item.from_seq}..{item.to_seq}[/]")
            elif isinstance(item, BadBatch):
                console.print(f"[red]bad batch {item.seq}: {item.reason}[/]")

    start = time.monotonic()
    period_s = 1.0 / rate_hz
    next_at = start
    gaps_seen = 0
    try:
        while time.monotonic() - start < duration_s:
            if not restarted and time.monotonic() - start > duration_s / 2:
                restarted = True
                pub.restart()
                published.append(0)
                console.print("[bold magenta]>>> restarting the publisher (seq back to 0, replay ring empty)[/]")
            last = time.monotonic() + period_s - start >= duration_s
            if last:  # a trailing drop is only noticed at the next batch: end on a clean one
                pub.set_faults(None)
            pub.publish(source.next_step(), time.time())
            published[-1] += 1
            next_at += period_s
            while (left_s := next_at - time.monotonic()) > 0:
                handle(sub.poll(int(left_s * 1000) + 1))
                if sub.counters.gaps > gaps_seen:
                    gaps_seen = sub.counters.gaps
                    console.print(f"[yellow]gap before seq {sub.expected_seq}+: asking the replay socket[/]")
        settle_end = time.monotonic() + _SETTLE_S
        while time.monotonic() < settle_end and (len(applied) < len(published) or
                                                 len(applied[-1]) < published[-1] or sub.replay_in_flight):
            handle(sub.poll(50))
    finally:
        sub.close()
        pub.close()

    missing = sum(max(0, n - len(applied[i]) if i < len(applied) else n) for i, n in enumerate(published))
    twice = sum(1 for c in applied for n in c.values() if n > 1)
    table = Table(title="event plane summary", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    total = sum(published)
    c = sub.counters
    rows = [
        ("batches published", f"{total}" + (f" ({' + '.join(map(str, published))})" if len(published) > 1 else "")),
        ("received live", str(live)),
        ("recovered by replay", str(replayed)),
        ("gaps detected / replay requests", f"{c.gaps} / {c.replays}"),
        ("duplicates discarded", str(c.duplicates)),
        ("publisher restarts detected", str(c.resets)),
        ("lost (unrecoverable)", str(lost)),
        ("missing", f"[bold {'green' if missing == 0 else 'red'}]{missing}[/]"),
        ("applied twice", f"[bold {'green' if twice == 0 else 'red'}]{twice}[/]"),
    ]
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)
    return 0 if missing == 0 and twice == 0 and lost == 0 else 1
