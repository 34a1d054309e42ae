"""``kvr bench engine``: emulated engine and block-pool speed (``bench/engine.py``).

Registered under the ``kvr bench`` group by ``cli/bench.py``; not a top-level command.
"""

from __future__ import annotations

import json
import logging

import click

logger = logging.getLogger(__name__)


@click.command("engine")
@click.option("--profile", default="a100-80gb-8b", show_default=True, help="Engine profile.")
@click.option("--batches", default="1,32,256", show_default=True, help="Comma-separated batch sizes.")
@click.option("--prompt-tokens", default=512, show_default=True, type=int)
@click.option("--output-tokens", default=256, show_default=True, type=int)
@click.option("--speedup", default=10.0, show_default=True, type=float, help="Speedup the CPU share is reported at.")
@click.option("--pool-requests", default=20_000, show_default=True, type=int, help="Block-pool lifecycles.")
@click.option("--live", default=0.0, type=float, help="Instead: run router + worker processes for S seconds.")
@click.option("--workers", default=1, show_default=True, type=int, help="--live: worker processes.")
@click.option("--concurrency", default=32, show_default=True, type=int, help="--live: requests in flight.")
@click.option("--stream-interval", default=1, show_default=True, type=int, help="--live: workers' --stream-interval.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per suite run.")
def bench_engine_cmd(profile: str, batches: str, prompt_tokens: int, output_tokens: int, speedup: float,
                     pool_requests: int, live: float, workers: int, concurrency: int, stream_interval: int,
                     as_json: bool) -> None:
    """Emulated tokens per wall second at each batch size, and block-pool operations per second."""
    from bench.engine import bench_block_pool, bench_engine

    if live > 0:
        from bench.engine_live import bench_live

        r = bench_live(workers=workers, concurrency=concurrency, duration_s=live, speedup=speedup, profile=profile,
                       stream_interval=stream_interval)
        if as_json:
            click.echo(json.dumps(r))
            return
        click.echo(f"live: {workers} worker(s) x{speedup:g} ({profile}), {concurrency} in flight, "
                   f"stream interval {stream_interval}, {r['elapsed_s']:.1f} s")
        click.echo(f"  {r['requests_per_s']:.1f} requests/s, {r['output_tokens_per_s']:,.0f} output tokens/s, "
                   f"{r['errors']} errors")
        click.echo(f"  CPU: router {r['router_cpu_cores']:.2f} cores, workers "
                   + ", ".join(f"{c:.2f}" for c in r["worker_cpu_cores"]) + " cores")
        click.echo("  workers' step wake-up lag mean/max (ms): "
                   + ", ".join(f"{a:.2f}/{b:.1f}"
                               for a, b in zip(r["worker_lag_mean_ms"], r["worker_lag_max_ms"], strict=True))
                   + "; resyncs: " + ", ".join(str(x) for x in r["worker_resyncs"]))
        return

    results = [bench_engine(profile=profile, batch=int(b), prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                            speedup=speedup) for b in batches.split(",")]
    pool = bench_block_pool(requests=pool_requests)
    if as_json:
        for r in [*results, pool]:
            click.echo(json.dumps(r))
        return
    click.echo(f"engine, profile {profile}, prompt {prompt_tokens}, output {output_tokens}")
    click.echo(f"{'batch':>6} {'emulated tok/s':>15} {'decode tok/s':>13} {'us/step':>9} "
               f"{f'CPU share @x{speedup:g}':>16}")
    for r in results:
        click.echo(f"{r['batch']:>6} {r['emulated_tokens_per_s']:>15,.0f} {r['decode_tokens_per_s']:>13,.0f} "
                   f"{r['wall_us_per_step']:>9,.0f} {r['cpu_share_at_speedup']:>16.3f}")
    click.echo(f"block pool: {pool['lifecycles_per_s']:,.0f} request lifecycles/s, {pool['block_ops_per_s']:,.0f} "
               f"block ops/s, hashing {pool['hash_blocks_per_s']:,.0f} blocks/s (hit rate {pool['hit_rate']:.2f}, "
               f"{pool['evictions']} evictions)")


COMMANDS: list = []  # lives under `kvr bench` (cli/bench.py)
