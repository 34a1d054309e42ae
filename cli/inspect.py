"""``kvr inspect``: workers, index sizes, stream positions and hot prefixes, read from Redis."""

from __future__ import annotations

import json
import sys
import time

import click

from cli.options import namespace_option, redis_url_option


@click.command("inspect")
@redis_url_option
@namespace_option
@click.option("--top", type=int, default=10, show_default=True, help="How many hottest prefixes to list.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.pass_context
def inspect_cmd(ctx: click.Context, redis_url: str, namespace: str, top: int, as_json: bool) -> None:
    """Show what Redis holds for NAMESPACE: workers, per-target seq/epoch/lag and blocks, shared prefixes.

    Without --redis-url (or KVR_REDIS_URL) it reads the running `kvr up`'s Redis, and its
    namespace unless --namespace is given.
    """
    import redis
    from rich.console import Console
    from rich.table import Table

    from bus.mirror_status import Cause
    from bus.redis_url import redact_url
    from cli.user_state import require_cluster
    from monitor.inspect import inspect_state
    from router.mirror import make_redis_client
    from router.mirror_health import cause_of

    if not redis_url:
        cluster = require_cluster(instead="--redis-url URL (or KVR_REDIS_URL)")
        redis_url = cluster["redis_url"]
        if ctx.get_parameter_source("namespace") is click.core.ParameterSource.DEFAULT:
            namespace = cluster.get("namespace", namespace)
    client = make_redis_client(redis_url, timeout_s=2.0)
    try:
        state = inspect_state(client, namespace=namespace, now_s=time.time(), top=top)
    except (redis.RedisError, OSError) as exc:
        why = {Cause.UNREACHABLE: "Redis unreachable", Cause.AUTH: "Redis refused the credentials"}.get(
            cause_of(exc), "Redis error")
        raise click.ClickException(f"cannot read {redact_url(redis_url)}: {why} ({exc})") from None
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    # Piped output (scripts, `| less`) gets a wide console instead of rich's 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 160)

    def age(v):
        return "–" if v is None else f"{v:.1f} s"

    t = Table(title=f"workers (namespace {namespace})")
    for col in ("worker", "alive", "epoch", "model", "blocks", "engine", "running", "waiting", "kv usage",
                "registered"):
        t.add_column(col)
    mirror = state["mirror"]
    for w in state["workers"]:
        load = w["load"]
        alive = "yes" if w["alive"] else f"[yellow]unknown ({mirror['cause']})[/yellow]" if w.get(
            "alive_unknown") else "[red]no[/red]"
        t.add_row(w["worker_id"], alive, str(w["epoch"]), w["model"],
                  str(w["num_gpu_blocks"]), w["engine"], str(int(load.get("running") or 0)),
                  str(int(load.get("waiting") or 0)),
                  f"{100 * load['kv_usage']:.0f}%" if load.get("kv_usage") is not None else "–",
                  age(w["registered_age_s"]))
    console.print(t)
    t = Table(title="targets (index mirror)")
    for col in ("target", "seq", "epoch", "batches", "events", "blocks", "last update"):
        t.add_column(col, justify="left" if col == "target" else "right")
    for tg in state["targets"]:
        t.add_row(tg["target"], str(tg["seq"]), str(tg["epoch"]), str(tg["batches"]), str(tg["events"]),
                  str(tg["blocks"]), age(tg["updated_age_s"]))
    console.print(t)
    routers = ", ".join(f"{k} (seen {age(v['last_seen_age_s'])} ago)" for k, v in state["routers"].items()) or "–"
    console.print(f"indexed blocks {state['indexed_blocks']}, distinct kvr block hashes {state['distinct_blocks']}; "
                  f"routers: {routers}")
    if mirror["state"] == "ok":
        console.print("mirror: ok" + (f" ({mirror['detail']})" if mirror["detail"] else ""), markup=False)
    else:
        # Routing is unaffected (routers route from memory); what is shown here is stale or incomplete.
        console.print(f"[red]mirror: {mirror['state']} ({mirror['cause']})[/red]: {mirror['detail']}; worker "
                      "liveness and block counts above are stale or incomplete until the routers rewrite it")
    t = Table(title="hottest prefixes (kvr block hashes held by the most targets)")
    t.add_column("block hash")
    t.add_column("targets", justify="right")
    for h in state["hottest_prefixes"]:
        t.add_row(h["block_hash"], str(h["targets"]))
    console.print(t)


COMMANDS = [inspect_cmd]
