"""``kvr profiles``: the engine profiles with their capacity and latency constants."""

from __future__ import annotations

import json
import logging

import click

logger = logging.getLogger(__name__)


@click.command("profiles")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def profiles_cmd(as_json: bool) -> None:
    """List the emulated engine's profiles (GPU x model): capacity, batch limits, latency."""
    from core.profiles import PROFILES

    described = [p.describe() for p in PROFILES.values()]
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    header = (f"{'profile':<15} {'blocks':>7} {'tokens':>9} {'seqs':>5} {'batch':>6} "
              f"{'prefill 512':>12} {'prefill 2k':>11} {'decode b1':>10} {'decode b32':>11}")
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


@click.command("capacity")
@click.option("--gpu-mem-gib", required=True, type=float, help="GPU memory as torch reports it (A100-40GB: 39.39).")
@click.option("--utilization", default=0.9, show_default=True, type=float, help="vLLM's --gpu-memory-utilization.")
@click.option("--weights-gib", required=True, type=float, help="Model weights in GiB.")
@click.option("--layers", required=True, type=int)
@click.option("--kv-heads", required=True, type=int, help="KV heads (GQA groups), per GPU.")
@click.option("--head-dim", default=128, show_default=True, type=int)
@click.option("--dtype-bytes", default=2, show_default=True, type=int, help="2 for bf16/fp16, 1 for fp8.")
@click.option("--block-size", default=16, show_default=True, type=int)
@click.option("--non-kv-gib", default=0.0, show_default=True, type=float, help="Activation peak + non-torch memory.")
def capacity_cmd(gpu_mem_gib: float, utilization: float, weights_gib: float, layers: int, kv_heads: int,
                 head_dim: int, dtype_bytes: int, block_size: int, non_kv_gib: float) -> None:
    """vLLM's KV capacity (num_gpu_blocks) for a GPU and a model."""
    from core.profiles import MIB, kv_block_bytes, kv_capacity_blocks

    try:
        blocks = kv_capacity_blocks(gpu_mem_gib, utilization, weights_gib, layers, kv_heads, head_dim, dtype_bytes,
                                    block_size, non_kv_gib)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    per_block = kv_block_bytes(layers=layers, kv_heads=kv_heads, head_dim=head_dim, dtype_bytes=dtype_bytes,
                               block_size=block_size)
    click.echo(f"{blocks} blocks x {block_size} tokens = {blocks * block_size} tokens "
               f"({per_block / MIB:g} MiB per block, {per_block // block_size // 1024} KiB per token)")


COMMANDS = [profiles_cmd, capacity_cmd]
