"""``kvr demo``: the main job — cache-blind vs cache-aware routing on a live local cluster.

For each policy (``round_robin``, then ``kvr``) a fresh cluster comes up on the
embedded default Redis (fresh so that no run inherits the other's warm caches),
the same seeded workload is driven through the router with ``--speedup``, the
monitor's dump is saved, and the cluster stops. Then the comparison table is
printed and ``report.md`` with its plots is written.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import click

from cli.options import redis_url_option
from cli.user_state import KEEP_RUNS

logger = logging.getLogger(__name__)

#: The demo workload: SGLang's generated-shared-prefix, sized for ~15 s of driving per policy.
DEFAULT_WORKLOAD = "gsp"
#: 16 system prompts of 96 blocks: more than one worker's 924 blocks, so a cache-blind router thrashes.
DEFAULT_PARAMS = {"num_groups": 16, "prompts_per_group": 16, "system_prompt_len": 1536, "question_len": 128,
                  "output_len": 32}


def _parse_params(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            raise click.BadParameter(f"{p!r} is not KEY=VALUE", param_hint="--param")
        out[key] = value
    return out


def _wait_for_monitor(url: str, expected: int, timeout_s: float) -> dict:
    """The monitor's dump once it has folded ``expected`` finished requests (or at the timeout)."""
    from monitor.dashboard import fetch_dump

    deadline = time.monotonic() + timeout_s
    dump: dict = {}
    while time.monotonic() < deadline:
        try:
            dump = fetch_dump(f"{url}/json")
        except (OSError, ValueError) as exc:
            logger.debug("monitor not readable yet: %s", exc)
        else:
            got = dump["summary"]["requests"] + sum(dump.get("errors_by_code", {}).values())
            if got >= expected:
                return dump
        time.sleep(0.25)
    logger.warning("the monitor saw fewer records than the %d requests sent", expected)
    return dump


@click.command("demo")
@click.option("--workers", "-n", type=click.IntRange(1, 16), default=3, show_default=True)
@click.option("--speedup", type=float, default=4.0, show_default=True,
              help="Emulated engines and the workload's clock run this much faster than real time.")
@click.option("--rate", "rate_per_s", type=float, default=4.0, show_default=True,
              help="Request arrivals per second of workload time (Poisson).")
@click.option("--workload", default=DEFAULT_WORKLOAD, show_default=True, help="A `kvr sim` workload name.")
@click.option("--param", "params", multiple=True, help="Workload parameter KEY=VALUE (repeatable).")
@click.option("--policy", "policies", multiple=True, default=["round_robin", "kvr"], show_default=True,
              help="Policies to compare, the first is the baseline (repeatable).")
@click.option("--profile", default="", help="Worker latency profile (default: the worker's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help=f"Directory for dumps, logs, report.md and plots (default: a new STATE/runs/demo-<time>-<pid>, "
                   f"the newest {KEEP_RUNS} kept; STATE: $KVR_STATE_DIR, else $XDG_STATE_HOME/kvr, else "
                   "~/.local/state/kvr). Its path is printed.")
@redis_url_option
@click.option("--crash-worker-at", "crash_at", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Crash worker-0 (SIGKILL) and restart it when this fraction of requests has finished: "
                   "the recovery timeline shows the router dropping and rebuilding its index.")
@click.option("--worker-arg", "worker_args", multiple=True,
              help="Extra argument for every worker, e.g. --worker-arg=--fault-drop=0.05 (repeatable).")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write the PNGs of the report.")
@click.option("--run-timeout", "run_timeout_s", type=float, default=240.0, show_default=True,
              help="Give up on a run after this many wall-clock seconds.")
@click.pass_context
def demo_cmd(ctx: click.Context, workers: int, speedup: float, rate_per_s: float, workload: str,
             params: tuple[str, ...], policies: tuple[str, ...], profile: str, seed: int, out_dir: str | None,
             redis_url: str, crash_at: float | None, worker_args: tuple[str, ...], plots: bool,
             run_timeout_s: float) -> None:
    """Bring up a local cluster per policy, drive one workload, print the comparison and write the report."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from bus.client import RouterClient
    from cli.user_state import new_run_dir
    from cluster.loadgen import drive_workload
    from cluster.local import ClusterConfig, LocalCluster
    from cluster.supervisor import ComponentFailed
    from monitor.dump import write_dump
    from monitor.report import write_report
    from monitor.results import run_results, table_rows
    from sim.workload import Poisson, assign_arrivals
    from sim.workloads import make_workload

    console = Console(stderr=True)
    wl_params = {**(DEFAULT_PARAMS if workload == DEFAULT_WORKLOAD else {}), **_parse_params(params)}
    try:
        probe = make_workload(workload, random.Random(seed), wl_params)
    except (KeyError, TypeError, ValueError) as exc:
        raise click.UsageError(f"workload {workload!r}: {exc}") from None
    # Only once the arguments are known good: a usage error leaves no empty run behind.
    out = Path(out_dir) if out_dir else new_run_dir("demo")
    out.mkdir(parents=True, exist_ok=True)
    n_roots = probe.num_roots()
    n_root_requests = sum(len(probe.root_requests(i)) for i in range(n_roots))
    console.print(f"[bold]kvr demo[/bold]: {workload} ({n_root_requests} requests, {wl_params}), "
                  f"{workers} workers, speedup {speedup:g}, {rate_per_s:g} req/s (workload time), "
                  f"policies {', '.join(policies)}; output in {out}")
    dumps = []
    code = 0
    with Progress(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        tasks = {p: progress.add_task(f"{p}: waiting", total=n_root_requests, start=False) for p in policies}
        for policy in policies:
            task = tasks[policy]
            rng = random.Random(seed)  # the same requests and arrivals for every policy
            wl = make_workload(workload, rng, wl_params)
            arrivals = assign_arrivals(wl, Poisson(rate_per_s), rng)
            run_dir = out / "runs" / policy
            progress.start_task(task)
            progress.update(task, description=f"{policy}: starting")
            cluster = LocalCluster(ClusterConfig(
                workers=workers, redis_url=redis_url, policy=policy, profile=profile, speedup=speedup,
                run_dir=run_dir, namespace=f"demo-{policy}".replace("_", "-"), label=policy, dump_interval_s=1.0,
                worker_args=list(worker_args),
            ))
            crashed = []

            # The defaults bind this iteration's values, not the loop variables'.
            def on_progress(done: int, known: int, t=task, c=cluster, crashed=crashed, policy=policy) -> None:
                progress.update(t, completed=done, total=known)
                if crash_at is not None and not crashed and done >= crash_at * known:
                    crashed.append(done)
                    progress.console.print(f"{policy}: crashing worker-0 after {done} requests (SIGKILL, restart)")
                    c.restart_worker("worker-0", crash=True, wait=False)

            try:
                with cluster:
                    progress.update(task, description=f"{policy}: running")
                    with RouterClient(endpoint=cluster.client_endpoint) as client:
                        res = drive_workload(
                            client, wl, arrivals, speedup=speedup, timeout_s=run_timeout_s, id_prefix=f"{policy}-",
                            progress=on_progress,
                            should_stop=lambda c=cluster: bool(c.supervisor.failed()),
                        )
                    cluster.check()
                    dump = _wait_for_monitor(cluster.monitor_url, len(res.results), timeout_s=15.0)
            except ComponentFailed as exc:
                progress.update(task, description=f"{policy}: FAILED")
                console.print(f"[red]{policy}: {exc}[/red]\nlogs: {run_dir / 'logs'}")
                code = cluster.exit_code() or 1
                break
            dump = {**dump, "label": policy, "client": {"sent": res.sent, "timed_out": res.timed_out,
                                                        "wall_s": res.wall_s}}
            write_dump(out / f"{policy}.json", dump)
            dumps.append(dump)
            progress.update(task, description=f"{policy}: done ({res.wall_s:.0f} s)")
    if not dumps:
        console.print(f"output (logs): {out}")
        ctx.exit(code or 1)
    header, rows = table_rows([run_results(d) for d in dumps])
    table = Table(title=f"kvr demo: {workload}, {workers} workers, speedup {speedup:g}")
    for k, h in enumerate(header):
        table.add_column(h, justify="left" if k == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    Console().print(f"latencies are wall clock at speedup {speedup:g}× "
                    f"(the emulated GPU's time is {speedup:g}× longer); "
                    f"hits = requests with any cached prompt token")
    notes = (f"Workload `{workload}` {json.dumps(wl_params)}, seed {seed}, Poisson {rate_per_s:g} req/s of workload "
             f"time; {workers} emulated workers at speedup {speedup:g}; a fresh cluster per policy. Latencies are "
             f"wall-clock at that speedup, as the router measured them.")
    report = write_report(dumps, out, title="kvr demo: cache-blind vs cache-aware routing", notes=notes, plots=plots)
    dump_paths = ", ".join(str(out / f"{d['label']}.json") for d in dumps)
    console.print(f"report: {report}\ndumps: {dump_paths}\noutput: {out}")
    ctx.exit(code)


COMMANDS = [demo_cmd]
