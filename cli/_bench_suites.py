"""``kvr bench overhead|basic|scale|stale|peer|peer-agreement|fuzz|faults|replicas|goodput|light-load``: the suites
of the ``bench/`` package.

Each command only parses options, runs the suite with a progress bar (stderr) and writes
``<suite>.json``, ``<suite>.md`` and plots into ``--out``; ``--json`` also prints the JSON on
stdout. The suite logic lives in ``bench/<suite>.py``. ``cli/bench.py`` adds
:data:`SUITE_COMMANDS` to its ``kvr bench`` group.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import click

from core.policies import POLICY_NAMES

_common_options = [
    click.option("--out", "out_dir", type=click.Path(file_okay=False), default="bench-results", show_default=True,
                 help="Folder for <suite>.json, <suite>.md and the plots."),
    click.option("--json", "as_json", is_flag=True, help="Also print the result as JSON on stdout."),
    click.option("--quick", is_flag=True, help="Tiny parameters (seconds): a smoke run, not a measurement."),
    click.option("--repeats", type=click.IntRange(min=1), default=None, help="Repetitions per measurement."),
    click.option("--seed", type=int, default=0, show_default=True),
]


def _with_common(f: Callable) -> Callable:
    for option in reversed(_common_options):
        f = option(f)
    return f


def _command_line() -> str:
    return "kvr " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def finish(result, out_dir: str, as_json: bool, *, plot=None, display=None) -> None:
    """Write the result files and say where they are (stderr), JSON on stdout with ``--json``."""
    from bench.results import render_markdown, write_result

    paths = write_result(result, out_dir, plot=plot, display=display)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=1, default=str))
    else:
        click.echo(render_markdown(result, display))
    click.echo("wrote " + ", ".join(str(p) for p in paths), err=True)


@click.command("overhead")
@_with_common
@click.option("--workers", default="8,64,512", show_default=True, help="Fleet sizes (comma-separated).")
@click.option("--index-blocks", default="10000,100000,1000000", show_default=True,
              help="Index sizes in (target, block) pairs (comma-separated).")
@click.option("--requests", type=click.IntRange(min=10), default=2000, show_default=True,
              help="Routed requests per measurement.")
@click.option("--no-redis", is_flag=True, help="Skip the Redis mirror measurements.")
@click.option("--echo/--no-echo", default=True, show_default=True,
              help="Router-added latency against a raw ZMQ echo through the same sockets (starts a router).")
def overhead(out_dir, as_json, quick, repeats, seed, workers, index_blocks, requests, no_redis, echo) -> None:
    """Router overhead: decision latency, ingestion, memory per block, Redis round trips, added latency."""
    from bench.overhead import OverheadConfig, display_tables, plot, run
    from bench.progress import RichProgress

    if quick:
        cfg = OverheadConfig.quick()
    else:
        cfg = OverheadConfig(workers=_ints(workers), index_blocks=_ints(index_blocks), requests=requests)
    cfg.seed = seed
    cfg.redis = not no_redis
    cfg.echo = echo
    if repeats:
        cfg.repeats = repeats
    result = run(cfg, command=_command_line(), progress=RichProgress("overhead"))
    finish(result, out_dir, as_json, plot=plot, display=display_tables(result))


@click.command("basic")
@_with_common
@click.option("--policy", "policies", multiple=True, help="Policies to run (repeatable; default: every policy).")
@click.option("--workers", type=click.IntRange(1, 32), default=4, show_default=True)
@click.option("--speedup", type=float, default=10.0, show_default=True, help="Emulated engine speed-up.")
@click.option("--rate", "rate_per_s", type=float, default=8.0, show_default=True,
              help="Poisson arrivals per second of workload time.")
@click.option("--warmup", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests left out of the metrics at the start of each run.")
@click.option("--param", "params", multiple=True,
              help="gsp workload parameter KEY=VALUE (repeatable), e.g. num_groups=32.")
def basic(out_dir, as_json, quick, repeats, seed, policies, workers, speedup, rate_per_s, warmup, params) -> None:
    """Every policy on a live cluster, same request sequence: hit rate, TTFT (hits vs misses), throughput."""
    from bench.basic import BasicConfig, display_tables, plot, run
    from bench.progress import RichProgress

    cfg = BasicConfig.quick() if quick else BasicConfig(workers=workers, speedup=speedup, rate_per_s=rate_per_s,
                                                        warmup=warmup)
    if policies:
        cfg.policies = tuple(policies)
    for pair in params:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--param")
        cfg.params[key] = value
    cfg.seed = seed
    if repeats:
        cfg.repeats = repeats
    cfg.out_dir = str(Path(out_dir) / "basic-runs")
    result = run(cfg, command=_command_line(), progress=RichProgress("basic"))
    finish(result, out_dir, as_json, plot=plot, display=display_tables(result))


@click.command("peer")
@_with_common
@click.option("--arm", "arms", multiple=True,
              help="Arms: kvr, kvr:<policy>, sglang:<policy>, vllm:<policy> (vllm-router) (repeatable; "
                   "default kvr and both sglang arms).")
@click.option("--workers", type=click.IntRange(1, 16), default=4, show_default=True)
@click.option("--speedup", type=float, default=10.0, show_default=True, help="Emulated engine speed-up.")
@click.option("--rate", "rate_per_s", type=float, default=8.0, show_default=True,
              help="Poisson arrivals per second of workload time.")
@click.option("--warmup", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests discarded at the start of each run.")
@click.option("--groups", type=click.IntRange(min=1), default=8, show_default=True, help="Shared system prompts.")
@click.option("--prompts-per-group", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--system-words", type=click.IntRange(min=1), default=500, show_default=True,
              help="Words per system prompt (the built-in tokenizer makes ~1.3 tokens of a word).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Output tokens per request, each streamed as one chunk (default: the suite's, 16).")
@click.option("--busy", is_flag=True, help="Keep one core busy with another process for the whole run.")
def peer(out_dir, as_json, quick, repeats, seed, arms, workers, speedup, rate_per_s, warmup, groups,
         prompts_per_group, system_words, max_tokens, busy) -> None:
    """kvr vs sglang-router (PyPI sglang-router) in front of the same emulated fleet, same requests."""
    from bench.peer import PeerConfig, display_tables, plot, run
    from bench.progress import RichProgress

    cfg = PeerConfig.quick() if quick else PeerConfig(workers=workers, speedup=speedup, rate_per_s=rate_per_s,
                                                      warmup=warmup, groups=groups,
                                                      prompts_per_group=prompts_per_group, system_words=system_words,
                                                      **({"max_tokens": max_tokens} if max_tokens else {}))
    if arms:
        cfg.arms = tuple(arms)
    if any(a.startswith("sglang:") for a in cfg.arms):
        try:
            import sglang_router  # noqa: F401
        except ImportError:
            raise click.ClickException("sglang-router is not installed: pip install sglang-router==0.3.2 "
                                       "(a benchmark-only package), or run --arm kvr") from None
    cfg.seed = seed
    cfg.busy = busy
    if repeats:
        cfg.repeats = repeats
    cfg.out_dir = str(Path(out_dir) / "peer-runs")
    result = run(cfg, command=_command_line(), progress=RichProgress("peer"))
    finish(result, out_dir, as_json, plot=plot, display=display_tables(result))


@click.command("peer-agreement")
@_with_common
@click.option("--workers", type=click.IntRange(1, 8), default=4, show_default=True)
@click.option("--speedup", type=float, default=2.0, show_default=True,
              help="Emulated engine speed-up (low: the client's view of the loads lags the router's by ms).")
@click.option("--rate", "rate_per_s", type=float, default=4.0, show_default=True,
              help="Poisson arrivals per second of workload time (low: few requests overlap).")
@click.option("--sequential", is_flag=True, help="One request at a time instead (every load 0).")
@click.option("--groups", type=click.IntRange(min=1), default=8, show_default=True, help="Shared system prompts.")
@click.option("--prompts-per-group", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--system-words", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--question-words", type=click.IntRange(min=1), default=30, show_default=True)
def peer_agreement(out_dir, as_json, quick, repeats, seed, workers, speedup, rate_per_s, sequential, groups,
                   prompts_per_group, system_words, question_words) -> None:
    """Live sglang-router cache_aware vs its model (sglang_router policy): how often they pick the same worker."""
    from bench.peer import PeerConfig
    from bench.peer_agreement import display_tables, run
    from bench.progress import RichProgress

    try:
        import sglang_router  # noqa: F401
    except ImportError:
        raise click.ClickException("sglang-router is not installed: pip install sglang-router==0.3.2 "
                                   "(a benchmark-only package)") from None
    cfg = PeerConfig.quick() if quick else PeerConfig(
        workers=workers, speedup=speedup, rate_per_s=rate_per_s, groups=groups, prompts_per_group=prompts_per_group,
        system_words=system_words, question_words=question_words)
    cfg.seed = seed
    cfg.repeats = repeats or 2  # one seed per repetition: seed, seed + 1, ...
    cfg.out_dir = str(Path(out_dir) / "peer-agreement-runs")
    result = run(cfg, sequential=sequential, command=_command_line(), progress=RichProgress("peer-agreement"))
    finish(result, out_dir, as_json, display=display_tables(result))


@click.command("scale")
@_with_common
@click.option("--workers", default="1,2,4,8,16", show_default=True, help="Fleet sizes (comma-separated).")
@click.option("--rates-per-worker", default="1,2,4", show_default=True,
              help="Offered load per worker, requests/s of workload time (comma-separated).")
@click.option("--duration", "duration_s", type=float, default=24.0, show_default=True,
              help="Workload seconds per load point.")
@click.option("--speedup", type=float, default=5.0, show_default=True, help="Emulated engine speed-up.")
def scale(out_dir, as_json, quick, repeats, seed, workers, rates_per_worker, duration_s, speedup) -> None:
    """1 → 16 workers under a rate sweep: throughput, TTFT p99, router CPU per request."""
    from bench.progress import RichProgress
    from bench.scale import ScaleConfig, plot, run

    if quick:
        cfg = ScaleConfig.quick()
    else:
        try:
            rates = tuple(float(x) for x in rates_per_worker.split(",") if x.strip())
        except ValueError:
            raise click.BadParameter(f"expected comma-separated numbers, got {rates_per_worker!r}") from None
        cfg = ScaleConfig(workers=_ints(workers), rates_per_worker=rates, duration_s=duration_s, speedup=speedup)
    cfg.seed = seed
    cfg.out_dir = str(Path(out_dir) / "scale-runs")
    result = run(cfg, command=_command_line(), progress=RichProgress("scale"))
    finish(result, out_dir, as_json, plot=plot)


@click.command("replicas")
@_with_common
@click.option("--replicas", default="1,2,4", show_default=True, help="Router replicas per point (comma-separated).")
@click.option("--workers", type=click.IntRange(1, 32), default=4, show_default=True)
@click.option("--rate", "rate_per_s", type=float, default=6.0, show_default=True,
              help="Requests/s of workload time.")
@click.option("--duration", "duration_s", type=float, default=30.0, show_default=True, help="Workload seconds.")
@click.option("--speedup", type=float, default=4.0, show_default=True, help="Emulated engine speed-up.")
@click.option("--no-kill", is_flag=True, help="Leave out the point that SIGKILLs one of two replicas.")
def replicas(out_dir, as_json, quick, repeats, seed, replicas, workers, rate_per_s, duration_s, speedup,
             no_kill) -> None:
    """1, 2, 4 router replicas on one fleet: hit rate, TTFT, router CPU per request; one replica killed."""
    from bench.progress import RichProgress
    from bench.replicas import ReplicasConfig, run

    cfg = ReplicasConfig.quick() if quick else ReplicasConfig(
        replicas=_ints(replicas), workers=workers, rate_per_s=rate_per_s, duration_s=duration_s, speedup=speedup)
    cfg.kill_case = not no_kill
    cfg.seed = seed
    cfg.out_dir = str(Path(out_dir) / "replicas-runs")
    result = run(cfg, command=_command_line(), progress=RichProgress("replicas"))
    finish(result, out_dir, as_json)


@click.command("goodput")
@_with_common
@click.option("--policy", "policies", multiple=True, type=click.Choice(POLICY_NAMES),
              help="Policies to compare (repeatable; default: kvr and round_robin).")
@click.option("--workers", type=click.IntRange(1, 32), default=4, show_default=True)
@click.option("--slo-ttft-p99", "slo_ttft_p99_s", type=click.FloatRange(min=0, min_open=True), default=0.5,
              show_default=True, help="TTFT p99 SLO, wall seconds as the clients measure it.")
@click.option("--slo-tpot-p99", "slo_tpot_p99_s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Optional TPOT p99 SLO, wall seconds.")
@click.option("--start-rate", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True,
              help="First probe's rate, requests/s of workload time.")
@click.option("--duration", "duration_s", type=float, default=40.0, show_default=True,
              help="Workload seconds per probe.")
@click.option("--speedup", type=float, default=4.0, show_default=True, help="Emulated engine speed-up.")
def goodput(out_dir, as_json, quick, repeats, seed, policies, workers, slo_ttft_p99_s, slo_tpot_p99_s, start_rate,
            duration_s, speedup) -> None:
    """Per policy, the highest rate a live fleet serves within a TTFT p99 SLO (bisection, as kvr sim --goodput)."""
    from bench.goodput import GoodputConfig, plot, run
    from bench.progress import RichProgress

    cfg = GoodputConfig.quick() if quick else GoodputConfig(
        workers=workers, slo_ttft_p99_s=slo_ttft_p99_s, slo_tpot_p99_s=slo_tpot_p99_s, start_rate=start_rate,
        duration_s=duration_s, speedup=speedup)
    if policies:
        cfg.policies = tuple(policies)
    cfg.seed = seed
    cfg.out_dir = str(Path(out_dir) / "goodput-runs")
    result = run(cfg, command=_command_line(), progress=RichProgress("goodput"))
    finish(result, out_dir, as_json, plot=plot)


@click.command("light-load")
@_with_common
@click.option("--policy", "policies", multiple=True, type=click.Choice(POLICY_NAMES),
              help="Policies to compare (repeatable; default: kvr and round_robin).")
@click.option("--workers", type=click.IntRange(1, 16), default=4, show_default=True)
@click.option("--rates", default="2,4,8", show_default=True, help="Poisson rates, requests/s (comma-separated).")
@click.option("--requests", type=click.IntRange(min=1), default=80, show_default=True, help="Requests per rate.")
def light_load(out_dir, as_json, quick, repeats, seed, policies, workers, rates, requests) -> None:
    """At light load: requests spread over idle workers, and cache hits at least as fast as misses."""
    from bench.light_load import LightLoadConfig, display_tables, run
    from bench.progress import RichProgress

    try:
        rate_list = [float(r) for r in rates.split(",") if r.strip()]
    except ValueError:
        raise click.BadParameter(f"not a list of numbers: {rates!r}", param_hint="--rates") from None
    if not rate_list or min(rate_list) <= 0:
        raise click.BadParameter("rates must be positive", param_hint="--rates")
    cfg = LightLoadConfig.quick() if quick else LightLoadConfig(workers=workers, rates_per_s=rate_list,
                                                                requests=requests)
    if policies:
        cfg.policies = list(policies)
    cfg.seed = seed
    result = run(cfg, command=_command_line(), progress=RichProgress("light-load"))
    finish(result, out_dir, as_json, display=display_tables(result))


@click.command("stale")
@_with_common
@click.option("--fault", "faults", multiple=True,
              type=click.Choice(["drop", "worker_restart", "clear", "router_restart", "redis_restart"]),
              help="Faults to inject (repeatable; default: all five).")
@click.option("--workers", type=click.IntRange(1, 16), default=3, show_default=True)
@click.option("--speedup", type=float, default=4.0, show_default=True, help="Emulated engine speed-up.")
@click.option("--pre", "pre_s", type=float, default=12.0, show_default=True,
              help="Wall seconds of load before the fault.")
@click.option("--post", "post_s", type=float, default=15.0, show_default=True, help="Wall seconds observed after it.")
def stale(out_dir, as_json, quick, repeats, seed, faults, workers, speedup, pre_s, post_s) -> None:
    """Recovery after each event-plane fault: time until index = truth and until hit rate is back."""
    from bench.progress import RichProgress
    from bench.stale import StaleConfig, display_tables, plot, run

    cfg = StaleConfig.quick() if quick else StaleConfig(workers=workers, speedup=speedup, pre_s=pre_s, post_s=post_s)
    if faults:
        cfg.faults = tuple(faults)
    cfg.seed = seed
    if repeats:
        cfg.repeats = repeats
    cfg.out_dir = str(Path(out_dir) / "stale-runs")
    result = run(cfg, command=_command_line(), progress=RichProgress("stale"))
    finish(result, out_dir, as_json, plot=plot, display=display_tables(result))


@click.command("fuzz")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="bench-results", show_default=True,
              help="Folder for fuzz.json and fuzz.md.")
@click.option("--json", "as_json", is_flag=True, help="Also print the result as JSON on stdout.")
@click.option("--quick", is_flag=True, help="2,000 cases per decoder (seconds): a smoke run.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cases", type=click.IntRange(min=1), default=100_000, show_default=True, help="Cases per decoder.")
@click.option("--target", "target_names", multiple=True,
              help="Decoders to fuzz (repeatable; default: all): vllm_events, client, worker, router, reply, "
                   "metrics, kv_stream, replay_request, http_completions, http_worker.")
def fuzz(out_dir, as_json, quick, seed, cases, target_names) -> None:
    """Every decoder at a socket edge on mutated and random input: cases, crashes, throughput."""
    from bench.fuzz import FuzzConfig, run
    from bench.progress import RichProgress

    cfg = FuzzConfig.quick() if quick else FuzzConfig(cases=cases)
    cfg.seed, cfg.targets = seed, tuple(target_names)
    try:
        result = run(cfg, command=_command_line(), progress=RichProgress("fuzz"))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--target") from None
    finish(result, out_dir, as_json)
    crashes = sum(r["crashes"] for r in result.tables["fuzz"])
    if crashes:
        raise click.ClickException(f"{crashes} crash(es): see the crashes table")


@click.command("faults")
@_with_common
@click.option("--case", "cases", multiple=True,
              type=click.Choice(["worker_kill", "worker_restart", "router_restart", "redis_restart", "redis_down",
                                 "redis_oom", "drop", "dup_reorder", "slow_subscriber", "client_disconnect",
                                 "worker_stall", "rogue_publisher", "router_stall", "impostor_hello",
                                 "impostor_hello_curve", "duplicate_worker", "lying_worker", "worker_stall_http",
                                 "client_disconnect_http", "router_replica_kill"]),
              help="Fault cases to run (repeatable; default: all twenty).")
@click.option("--workers", type=click.IntRange(2, 16), default=2, show_default=True)
@click.option("--speedup", type=float, default=20.0, show_default=True, help="Emulated engine speed-up.")
@click.option("--redis-down", "redis_down_s", type=float, default=3.0, show_default=True,
              help="Seconds Redis stays unreachable (SIGSTOP) in the redis_down case.")
def faults(out_dir, as_json, quick, repeats, seed, cases, workers, speedup, redis_down_s) -> None:
    """The fault suite on a live cluster: sent, completed, errored, lost; recovery of the index and hit rate."""
    from bench.faults import FaultsConfig, display_tables, run
    from bench.progress import RichProgress

    cfg = FaultsConfig(workers=workers, speedup=speedup, redis_down_s=redis_down_s, seed=seed)
    if quick:
        cfg.cases = ("drop",)
    if cases:
        cfg.cases = tuple(cases)
    if repeats:
        cfg.cases = tuple(c for c in cfg.cases for _ in range(repeats))
    cfg.out_dir = str(Path(out_dir) / "faults-runs")
    result = run(cfg, command=_command_line(), progress=RichProgress("faults"))
    finish(result, out_dir, as_json, display=display_tables(result))
    bad = [r for r in result.tables["runs"] if r["lost"] or r["crashed"] or r["unmatched_replies"]]
    if bad:
        raise click.ClickException(f"{len(bad)} case(s) lost requests or crashed a component: see the table")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


SUITE_COMMANDS = [overhead, basic, peer, peer_agreement, scale, stale, fuzz, faults, replicas, goodput, light_load]

