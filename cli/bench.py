"""``kvr bench``: benchmarks (not tests). Each suite prints a table; results live in docs/benchmarks.md.

Adding a suite: write ``suite_<name>(**options) -> BenchTable`` (measure, return rows;
ratios against a baseline measured in the same run), and a thin click command under
:data:`bench` that calls it and :func:`print_table`. Heavy imports go inside the suite.

``kvr bench events``:

* decode throughput of realistic vLLM 0.33 payloads (one ``BlockStored`` of 1-32
  blocks plus 0-3 one-hash ``BlockRemoved``, as the GPU block pool emits), kvr's
  typed decoder vs a generic ``msgspec.msgpack.decode`` of the same bytes, single
  thread (= per core), best of ``--repeats``;
* publisher → subscriber over loopback tcp (publisher in its own process, as vLLM's
  is; subscriber receiving, ordering, de-duplicating and decoding in this one):
  batches/s and block events/s applied.
"""

from __future__ import annotations

import platform
import random
import statistics
import time
from dataclasses import dataclass, field

import click

from core.blocks import DEFAULT_BLOCK_SIZE


@dataclass
class BenchTable:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def print_table(table: BenchTable) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Table(title=table.title)
    for i, column in enumerate(table.columns):
        out.add_column(column, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in table.rows:
        out.add_row(*row)
    console = Console(width=max(120, Console().width))
    console.print(out)
    for note in table.notes:
        console.print(note)


def _realistic_batches(n: int, seed: int, *, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[list, int]:
    """n batches like the fixtures; returns (batches, block events = hashes stored + removed)."""
    from core.events import BlockRemoved, BlockStored, KVEventBatch

    rng = random.Random(seed)
    batches, block_events = [], 0
    for i in range(n):
        n_blocks = rng.randint(1, 32)
        events = [BlockStored(
            block_hashes=[rng.getrandbits(64) for _ in range(n_blocks)], parent_block_hash=rng.getrandbits(64),
            token_ids=[rng.randrange(151_936) for _ in range(n_blocks * block_size)], block_size=block_size,
            lora_id=None, medium="GPU", lora_name=None, extra_keys=[None] * n_blocks, group_idx=0,
            kv_cache_spec_kind="full_attention")]
        n_removed = rng.randint(0, 3)
        events += [BlockRemoved(block_hashes=[rng.getrandbits(64)], medium="GPU", group_idx=0)
                   for _ in range(n_removed)]
        block_events += n_blocks + n_removed
        batches.append(KVEventBatch(1.7e9 + i, events, 0))
    return batches, block_events


def _interleaved_rates(variants: dict, units: int, repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """(units per CPU second, units per wall second) of each variant (fn, payloads), per pass.

    CPU time is this thread's (``time.thread_time``): on a shared machine it is the
    honest "per core" figure, since time spent descheduled does not count. Passes
    interleave, so load drift hits every variant alike.
    """
    rates: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in variants}
    for _ in range(repeats):
        for name, (fn, payloads) in variants.items():
            cpu0, wall0 = time.thread_time(), time.perf_counter()
            for payload in payloads:
                fn(payload)
            rates[name][0].append(units / (time.thread_time() - cpu0))
            rates[name][1].append(units / (time.perf_counter() - wall0))
    return rates


def _publisher_process(conn, n_batches: int, seed: int) -> None:
    """Child process: publish n realistic batches as fast as it can, then serve replays until told."""
    from bus.publisher import EventPublisher
    from bus.vllm_codec import encode_batch

    batches, block_events = _realistic_batches(n_batches, seed)
    payloads = [encode_batch(b) for b in batches]
    del batches
    pub = EventPublisher(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", bind=True,
                         buffer_steps=n_batches)
    conn.send((pub.endpoint, pub.replay_endpoint, block_events))
    try:
        while not conn.poll(0.01):  # "go" once the subscriber is connected
            pub.poll_replay(0)
        conn.recv()
        for i, payload in enumerate(payloads):
            pub.publish_raw(payload)
            if i % 256 == 0:
                pub.poll_replay(0)
        while not conn.poll(0.001):
            pub.poll_replay(10)
    finally:
        pub.close()


def _loopback_throughput(n_batches: int, seed: int, timeout_s: float = 120.0) -> dict:
    """A publisher process and this process's subscriber: time from "go" to the last batch applied."""
    import multiprocessing

    from bus.subscriber import AppliedBatch, EventSubscriber

    mp = multiprocessing.get_context("spawn")
    parent, child = mp.Pipe()
    proc = mp.Process(target=_publisher_process, args=(child, n_batches, seed), name="bench-publisher", daemon=True)
    proc.start()
    try:
        if not parent.poll(timeout_s):
            raise click.ClickException("benchmark publisher did not start")
        endpoint, replay, block_events = parent.recv()
        sub = EventSubscriber(endpoint=endpoint, replay_endpoint=replay)
        settle = time.monotonic() + 1.0  # connect, finish the first-contact replay
        while time.monotonic() < settle:
            sub.poll(10)
        applied = 0
        parent.send("go")
        start, cpu0 = time.perf_counter(), time.process_time()
        deadline = time.monotonic() + timeout_s
        while applied < n_batches and time.monotonic() < deadline:
            applied += sum(isinstance(item, AppliedBatch) for item in sub.poll(50))
        elapsed_s = time.perf_counter() - start
        cpu_s = time.process_time() - cpu0  # the subscriber process: main and zmq I/O threads
        parent.send("stop")
        counters = sub.counters
        sub.close()
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    return {"applied": applied, "elapsed_s": elapsed_s, "cpu_s": cpu_s, "batches_s": applied / elapsed_s,
            "batches_cpu_s": applied / cpu_s, "block_events_cpu_s": block_events * applied / n_batches / cpu_s,
            "block_events_s": block_events * applied / n_batches / elapsed_s, "gaps": counters.gaps,
            "replayed": counters.replayed_batches}


def suite_events(*, batches: int = 5000, repeats: int = 7, seed: int = 1, loopback_batches: int = 20000) -> BenchTable:
    """Decode throughput (typed fast path vs generic msgpack) and loopback pub → sub throughput."""
    import msgspec

    from bus.vllm_codec import VllmEventDecoder, encode_batch
    from core.events import KVEventBatch

    decoded, block_events = _realistic_batches(batches, seed)
    payloads = [encode_batch(b) for b in decoded]
    legacy = [encode_batch(b, legacy=True) for b in decoded]
    n_events = sum(len(b.events) for b in decoded)
    mean_bytes = sum(map(len, payloads)) / len(payloads)

    table = BenchTable(
        title="kvr bench events",
        columns=["measurement", "block events / CPU s", "batches / CPU s", "block events / wall s", "vs generic"],
    )
    baseline = "decode, generic msgspec.msgpack (baseline)"
    variants = {
        "decode, kvr VllmEventDecoder, 0.33 maps": (VllmEventDecoder().decode, payloads),
        baseline: (msgspec.msgpack.decode, payloads),
        "decode, kvr VllmEventDecoder, legacy arrays": (VllmEventDecoder().decode, legacy),
        "decode, generic msgpack + msgspec.convert to structs":
            (lambda p: msgspec.convert(msgspec.msgpack.decode(p), KVEventBatch), payloads),
    }
    rates = _interleaved_rates(variants, block_events, repeats)
    for name, (cpu, wall) in rates.items():
        ratios = [r / b for r, b in zip(cpu, rates[baseline][0], strict=True)]
        per_cpu = statistics.median(cpu)
        table.rows.append([name, f"{per_cpu:,.0f}", f"{per_cpu * batches / block_events:,.0f}",
                           f"{statistics.median(wall):,.0f}", f"{statistics.median(ratios):.2f}x"])

    result = _loopback_throughput(loopback_batches, seed + 1)
    table.rows.append([
        "publisher → subscriber, tcp loopback (subscriber process CPU)",
        f"{result['block_events_cpu_s']:,.0f}", f"{result['batches_cpu_s']:,.0f}", f"{result['block_events_s']:,.0f}",
        "-"])
    table.notes += [
        f"{batches} batches, {n_events} events, {block_events} block events (hashes stored + removed), "
        f"{mean_bytes:.0f} B/payload mean; decode is single-threaded: per CPU second = per core; "
        f"medians of {repeats} interleaved passes; 'vs generic' = median per-pass ratio of CPU rates.",
        f"loopback: {result['applied']}/{loopback_batches} batches applied, {result['gaps']} gaps, "
        f"{result['replayed']} batches replayed; "
        f"{result['elapsed_s']:.2f} s wall ({result['batches_s']:,.0f} batches/s end to end), "
        f"{result['cpu_s']:.2f} s subscriber CPU.",
        f"python {platform.python_version()}, msgspec {msgspec.__version__}, {platform.machine()}",
    ]
    return table


@click.group("bench")
def bench() -> None:
    """Benchmarks (not tests): each suite measures, compares to a baseline and prints a table."""


@bench.command("events")
@click.option("--batches", type=click.IntRange(min=10), default=5000, show_default=True,
              help="Batches decoded per pass.")
@click.option("--repeats", type=click.IntRange(min=1), default=7, show_default=True)
@click.option("--loopback-batches", type=click.IntRange(min=10), default=20000, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
def bench_events(batches: int, repeats: int, loopback_batches: int, seed: int) -> None:
    """KV-event plane: decode throughput per core and publisher → subscriber throughput."""
    print_table(suite_events(batches=batches, repeats=repeats, seed=seed, loopback_batches=loopback_batches))


# The suites of the bench/ package (overhead, basic, scale, stale, peer): JSON + markdown + plots.
from cli._bench_suites import SUITE_COMMANDS  # noqa: E402

for _command in SUITE_COMMANDS:
    bench.add_command(_command)

# The emulated engine's suite (cli/bench_engine.py): engine tokens/s, block-pool ops/s, --live processes.
from cli.bench_engine import bench_engine_cmd  # noqa: E402

bench.add_command(bench_engine_cmd, name="engine")

COMMANDS = [bench]
