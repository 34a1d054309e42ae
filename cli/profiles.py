"""``kvr profiles``: the engine profiles with their capacity and latency constants."""

from __future__ import annotations

import json

import click


@click.command("profiles")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def profiles_cmd(as_json: bool) -> None:
    """List the emulated engine's profiles (GPU x model): capacity, batch limits, latency."""
    from core.profiles import PROFILES

    described = [p.describe() for p in PROFILES.values()]
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    header = f"{'profile':<15} {'blocks':>7} {'tokens':>9} {'seqs':>5} {'batch':>6} {'prefill 512':>12} {'prefill 2k':>11} {'decode b1':>10} {'decode b32':>11}"
    click.echo(header)
    click.echo("-" * len(header))
    for d in described:
        ex = d["examples_ms"]
        click.echo(
            f"{d['name']:<15} {d['num_gpu_blocks']:>7} {d['capacity_tokens']:>9} {d['max_num_seqs']:>5} "
            f"{d['max_num_batched_tokens']:>6} {ex['prefill_512']:>9.1f} ms {ex['prefill_2048']:>8.1f} ms "
            f"{ex['decode_batch1_ctx1k']:>7.1f} ms {ex['decode_batch32_ctx1k']:>8.1f} ms"
        )
    click.echo("\nlatency constants and sources: kvr profiles --json")


COMMANDS = [profiles_cmd]
