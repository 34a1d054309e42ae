"""``kvr sim``: compare routing policies on a workload or a trace, on a virtual clock.

Examples::

    kvr sim --workload gsp --policy all --workers 8 --rate 20
    kvr sim --trace traces/mooncake_fast25_conversation_trace.jsonl --policy kvr,round_robin --json
    kvr sim --workload multiturn -p num_clients=64 --concurrency 32 --policy all
    kvr sim --workload gsp --rate-sweep 5,10,20,40 --plots out/
    kvr sim --workload gsp --goodput --slo-ttft-p99 0.5 --policy kvr,sglang,round_robin --plots out/
    kvr sim --workload gsp --rate 20 --churn-every-s 10 --churn-kind restart --join-at-s 30

``--goodput`` searches, per policy, the highest rate (``--workload``) or trace speed-up
(``--trace``) that meets the SLO (sim/goodput.py defines the predicate and the search). When
no probed load meets it the table says "none", a note says so in one line, and the exit
status is still 0: "none" is the search's answer, not an error (JSON: ``"goodput": null``).
"""

from __future__ import annotations

import sys
import time

import click

_GSP_FLAGS = (
    ("num_groups", int), ("prompts_per_group", int), ("system_prompt_len", int), ("question_len", int),
    ("output_len", int), ("range_ratio", float), ("num_turns", int), ("zipf_alpha", float),
    ("drift_every", int), ("drift_step", int), ("lora_adapters", int),
)  # fmt: skip


def _gsp_options(func):
    for name, typ in reversed(_GSP_FLAGS):
        func = click.option(f"--gsp-{name.replace('_', '-')}", f"gsp_{name}", type=typ, default=None,
                            help=f"SGLang gsp: {name} (workload gsp).")(func)
    func = click.option("--gsp-ordered", "gsp_ordered", is_flag=True, default=None,
                        help="SGLang gsp: keep group order.")(func)
    func = click.option("--gsp-group-distribution", "gsp_group_distribution", type=click.Choice(["uniform", "zipf"]),
                        default=None, help="SGLang gsp: group popularity.")(func)
    return func


def _parse_params(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="-p/--param")
        out[key.strip()] = value.strip()
    return out


class _Progress:
    """A one-line stderr bar (only on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._last = -1

    def __call__(self, label: str, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        pct = done * 100 // total
        if pct == self._last and done != total:
            return
        self._last = pct
        bar = "#" * (pct * 30 // 100)
        end = "\n" if done == total else ""
        sys.stderr.write(f"\r{label:>14} [{bar:<30}] {pct:3d}% {done}/{total}{end}")
        sys.stderr.flush()
        if done == total:
            self._last = -1


def _check_goodput_flags(*, goodput, slo_ttft_p99, slo_tpot_p99, tolerance, start, rate, rate_sweep, concurrency,
                         speedup_given) -> None:
    """Usage errors of the goodput flags (one line each)."""
    if not goodput:
        if slo_ttft_p99 is not None or slo_tpot_p99 is not None or tolerance is not None:
            raise click.UsageError("--slo-* and --goodput-tolerance apply to --goodput only")
        return
    if slo_ttft_p99 is None:
        raise click.UsageError("--goodput needs --slo-ttft-p99")
    if rate is not None or rate_sweep or speedup_given:
        raise click.UsageError("--goodput searches the rate (or trace speed-up) itself: drop "
                               "--rate/--rate-sweep/--speedup")
    if concurrency is not None:
        # A client-side cap hides overload in the client's queue, which the SLO cannot see.
        raise click.UsageError("--goodput needs open-loop arrivals: drop --concurrency")
    for flag, v in (("--slo-ttft-p99", slo_ttft_p99), ("--slo-tpot-p99", slo_tpot_p99), ("--goodput-start", start)):
        if v is not None and not v > 0:
            raise click.BadParameter("must be positive", param_hint=flag)
    if tolerance is not None and not 0 < tolerance < 1:
        raise click.BadParameter("must be in (0, 1)", param_hint="--goodput-tolerance")


@click.command("sim")
@click.option("--workload", "workload_name", default=None, help="Synthetic workload (see --list-workloads).")
@click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Mooncake JSONL trace.")
@click.option("--trace-block-tokens", type=int, default=512, show_default=True, help="Tokens per trace hash id.")
@click.option("--trace-mapping", type=click.Choice(["compressed", "faithful"]), default="compressed", show_default=True,
              help="compressed: one id -> one block; faithful: each id expands to its tokens.")
@click.option("--trace-limit", type=int, default=None, help="Only the first N trace rows.")
@click.option("-p", "--param", "params", multiple=True, help="Workload parameter KEY=VALUE (repeatable).")
@_gsp_options
@click.option("--policy", "policy_arg", default="all", show_default=True, help="P[,P...] or 'all'.")
@click.option("--workers", type=int, default=8, show_default=True)
@click.option("--profile", default=None,
              help="Engine profile (kvr profiles), or one per worker comma-separated; default: the engine's default.")
@click.option("--num-gpu-blocks", type=int, default=None,
              help="Override the profile's KV capacity per worker (blocks).")
@click.option("--max-model-len", type=int, default=None,
              help="Max model length (tokens). Default: the profile's, raised to fit the workload's longest request, "
                   "at most a 128k-token model's.")
@click.option("--rate", type=float, default=None,
              help="Poisson (or bursty) request rate, roots/s. Default: all at once (synthetic) or trace timestamps.")
@click.option("--rate-sweep", default=None, help="Comma-separated rates: one comparison per rate.")
@click.option("--burstiness", type=float, default=None,
              help="Gamma arrivals with this shape (1 = Poisson, < 1 burstier).")
@click.option("--speedup", type=float, default=1.0, show_default=True, help="Trace timestamps divided by this.")
@click.option("--concurrency", type=int, default=None, help="Cap on requests in flight (closed loop when no rate).")
@click.option("--event-delay-ms", type=float, default=0.0, show_default=True,
              help="KV events reach the router this late.")
@click.option("--heartbeat-ms", type=float, default=1000.0, show_default=True,
              help="Load heartbeat interval (0: always fresh).")
@click.option("--tentative-s", type=float, default=None,
              help="Predict-on-route window of the router (default: the router's).")
@click.option("--network-ms", type=float, default=0.0, show_default=True, help="One-way router<->worker latency.")
@click.option("--churn-every-s", type=float, default=0.0, show_default=True,
              help="Churn one worker every S seconds, round-robin over the fleet (0: never; sim/churn.py).")
@click.option("--churn-kind", type=click.Choice(["reset", "restart"]), default="reset", show_default=True,
              help="reset: its prefix cache is cleared (AllBlocksCleared, running requests recompute); "
                   "restart: a new incarnation, its requests retried before their first token, else failed.")
@click.option("--churn-first-s", type=float, default=None, help="Time of the first churn (default: --churn-every-s).")
@click.option("--join-at-s", default=None, help="T[,T...]: one more worker joins the fleet at each time (scale-out).")
@click.option("--goodput", is_flag=True,
              help="Search each policy's highest rate (or trace speed-up) that meets the SLO.")
@click.option("--slo-ttft-p99", type=float, default=None,
              help="Goodput SLO: TTFT p99 bound, seconds (required with --goodput).")
@click.option("--slo-tpot-p99", type=float, default=None, help="Goodput SLO: also a TPOT p99 bound, seconds.")
@click.option("--goodput-tolerance", type=float, default=None,
              help="Goodput: relative tolerance of the bisection [default: 0.05].")
@click.option("--goodput-start", type=float, default=1.0, show_default=True,
              help="Goodput: first rate (or speed-up) probed.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the JSON report here.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False), default=None, help="Write PNG plots here.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--list-workloads", is_flag=True, help="List workloads and their parameters, then exit.")
def sim_command(workload_name, trace_path, trace_block_tokens, trace_mapping, trace_limit, params, policy_arg, workers,
                profile, num_gpu_blocks, max_model_len, rate, rate_sweep, burstiness, speedup, concurrency,
                event_delay_ms, heartbeat_ms, tentative_s, network_ms,
                churn_every_s, churn_kind, churn_first_s, join_at_s,
                goodput, slo_ttft_p99, slo_tpot_p99, goodput_tolerance, goodput_start, seed, as_json, out_path,
                plots_dir, no_progress, list_workloads, **gsp):
    """Compare routing policies on a workload or trace with the live engine and router cores."""
    import random
    from pathlib import Path

    from sim.workloads import WORKLOADS, config_fields, make_workload

    if list_workloads:
        for name in sorted(WORKLOADS):
            fields = ", ".join(f"{k}={v}" for k, v in config_fields(name).items())
            click.echo(f"{name}: {fields}")
        return

    from core.policies import POLICY_NAMES
    from core.profiles import DEFAULT_PROFILE, PROFILES
    from sim.churn import ChurnConfig
    from sim.cluster import ClusterConfig
    from sim.context import LONG_CONTEXT_TOKENS, fitted_max_model_len
    from sim.rejections import all_rejected, rejection_message
    from sim.report import comparison_report, markdown_table, rejection_runs, run_policies, to_json
    from sim.trace import load_trace
    from sim.workload import AllAtOnce, Bursty, Poisson, TraceTimes
    if (workload_name is None) == (trace_path is None):
        raise click.UsageError("give exactly one of --workload or --trace")
    _check_goodput_flags(goodput=goodput, slo_ttft_p99=slo_ttft_p99, slo_tpot_p99=slo_tpot_p99,
                         tolerance=goodput_tolerance,
                         start=goodput_start, rate=rate, rate_sweep=rate_sweep, concurrency=concurrency,
                         speedup_given=speedup != 1.0)
    policies = list(POLICY_NAMES) if policy_arg == "all" else [p.strip() for p in policy_arg.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown:
        raise click.BadParameter(f"unknown {unknown}; choose from {', '.join(POLICY_NAMES)} or all",
                                 param_hint="--policy")
    profile = profile or DEFAULT_PROFILE
    names = [p.strip() for p in profile.split(",")]
    for name in names:
        if name not in PROFILES:
            raise click.BadParameter(f"unknown profile {name!r}; known: {', '.join(PROFILES)}", param_hint="--profile")
    if len(names) > 1 and len(names) != workers:
        raise click.BadParameter(f"{len(names)} profiles for {workers} workers: give one, or one per worker",
                                 param_hint="--profile")
    try:
        joins = tuple(float(x) for x in join_at_s.split(",") if x.strip()) if join_at_s else ()
        churn = ChurnConfig(every_s=churn_every_s, kind=churn_kind, first_s=churn_first_s, join_at_s=joins)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--churn-*/--join-at-s") from exc
    config = ClusterConfig(num_workers=workers, profile=names if len(names) > 1 else names[0],
                           event_delay_s=event_delay_ms / 1e3,
                           heartbeat_interval_s=heartbeat_ms / 1e3, network_latency_s=network_ms / 1e3, churn=churn)
    if num_gpu_blocks is not None:
        config.engine_overrides["num_gpu_blocks"] = num_gpu_blocks
    if max_model_len is not None:
        config.engine_overrides["max_model_len"] = max_model_len
    if tentative_s is not None:
        config.router_options["tentative_window_s"] = tentative_s
    block_size = PROFILES[names[0]].block_size

    if trace_path is not None:
        trace = load_trace(trace_path, mapping=trace_mapping, trace_block_tokens=trace_block_tokens,
                           block_size=block_size, limit=trace_limit)
        title = f"{trace.name} ({trace_mapping})"
        probe = trace

        def make_wl():
            return trace  # stateless apart from a hash memo that is safe to share
    else:
        wl_params = _parse_params(params)
        wl_params.update({k[4:]: v for k, v in gsp.items() if v is not None})
        if any(v is not None for v in gsp.values()) and workload_name != "gsp":
            raise click.UsageError("--gsp-* flags apply to --workload gsp only")
        title = workload_name
        try:
            probe = make_workload(workload_name, random.Random(seed), wl_params)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--workload/-p") from exc

        def make_wl():
            return make_workload(workload_name, random.Random(seed), wl_params)

    if max_model_len is None:
        # No context given: fit the workload's longest request, up to a 128k-token model
        # (sim/context.py says why a router's user expects this).
        longest, cap = probe.longest_request_tokens(), probe.engine_tokens(LONG_CONTEXT_TOKENS)
        fitted = fitted_max_model_len(longest_tokens=longest, cap_tokens=cap,
                                      profile_max_model_lens=[PROFILES[n].max_model_len for n in names])
        if fitted is not None:
            config.engine_overrides["max_model_len"] = fitted
            native = "/".join(sorted({str(PROFILES[n].max_model_len) for n in names}))
            scaled = " (in the trace's compressed tokens)" if cap != LONG_CONTEXT_TOKENS else ""
            why = f"a {LONG_CONTEXT_TOKENS}-token model's context{scaled}" if longest > cap else "the workload"
            click.echo(f"note: max_model_len {fitted} tokens to fit {why} (profile {profile}: {native}); "
                       f"pin it with --max-model-len", err=True)
    del probe

    def check_rejections(results, where=""):
        """The rejection warning for ``results`` (None: none); an all-rejected run is an error."""
        runs = rejection_runs(results)
        msg = rejection_message(runs)
        if all_rejected(runs):
            raise click.ClickException(f"no request ran{where}: {msg}")
        return msg

    def arrivals_for(r, trace_speedup=speedup):
        if r is not None:
            if burstiness is not None:
                return lambda: Bursty(rate_per_s=r, burstiness=burstiness, max_concurrency=concurrency)
            return lambda: Poisson(rate_per_s=r, max_concurrency=concurrency)
        if trace_path is not None:
            return lambda: TraceTimes(speedup=trace_speedup, max_concurrency=concurrency)
        return lambda: AllAtOnce(max_concurrency=concurrency)

    progress = _Progress(not no_progress)
    t0 = time.perf_counter()
    if goodput:
        from sim import goodput as gp

        slo = gp.Slo(ttft_p99_s=slo_ttft_p99, tpot_p99_s=slo_tpot_p99)
        tolerance = gp.DEFAULT_TOLERANCE if goodput_tolerance is None else goodput_tolerance
        searches, rejected_runs = {}, {}
        for name in policies:
            def probe(load, _name=name):
                # A rate for a workload, a speed-up for a trace: one full run, same seed.
                arrivals = arrivals_for(None, load) if trace_path is not None else arrivals_for(load)
                result = run_policies(make_workload=make_wl, make_arrivals=arrivals, policies=[_name], config=config,
                                      seed=seed, progress=lambda n, d, t: progress(f"{n}@{load:.3g}", d, t))[_name]
                if result.rejected and _name not in rejected_runs:
                    # A rejection fails the SLO at any load; the warning says which limit to raise.
                    rejected_runs[_name] = (result.requests, result.rejections)
                return gp.probe_stats(result)

            searches[name] = gp.find_goodput(probe, slo=slo, start=goodput_start, tolerance=tolerance)
        load_kind = gp.LOAD_SPEEDUP if trace_path is not None else gp.LOAD_RATE
        report = gp.goodput_report(searches, load=load_kind, slo=slo, start=goodput_start, tolerance=tolerance,
                                   seed=seed)
        folds = {}
        if not as_json:
            tpot = f", TPOT p99 ≤ {slo_tpot_p99:g} s" if slo_tpot_p99 is not None else ""
            click.echo(f"## {title}: goodput at TTFT p99 ≤ {slo_ttft_p99:g} s{tpot}, "
                       f"{workers} workers, profile {profile}\n\n"
                       f"{gp.goodput_table(report)}")
        for line in gp.summary_lines(report):
            click.echo(f"note: {line}", err=True)
        msg = rejection_message(rejected_runs)
        if msg is not None:
            click.echo(f"warning: {msg}", err=True)
    elif rate_sweep:
        rates = [float(x) for x in rate_sweep.split(",") if x.strip()]
        sweep, bound, last, warnings = [], float("nan"), None, {}
        for r in rates:
            results = run_policies(make_workload=make_wl, make_arrivals=arrivals_for(r), policies=policies,
                                   config=config, seed=seed,
                                   progress=lambda n, d, t, _r=r: progress(f"{n}@{_r:g}", d, t))
            msg = check_rejections(results, f" at {r:g} req/s")
            if msg is not None:
                warnings.setdefault(msg, []).append(f"{r:g}")
            rep = comparison_report(results)
            bound = rep["upper_bound"]
            sweep.append({"rate_per_s": r, "policies": rep["policies"]})
            last = results
            if not as_json:
                click.echo(f"\n## {title} at {r:g} req/s\n\n{markdown_table(rep)}")
        report = {"upper_bound": bound, "sweep": sweep}
        folds = {n: res.fold for n, res in last.items()} if last else {}
        for msg, at in warnings.items():
            # One line per distinct warning (with one profile the rate changes nothing).
            where = "" if len(at) == len(rates) else f" at {','.join(at)} req/s"
            click.echo(f"warning{where}: {msg}", err=True)
    else:
        results = run_policies(make_workload=make_wl, make_arrivals=arrivals_for(rate), policies=policies,
                               config=config, seed=seed, progress=progress)
        msg = check_rejections(results)
        report = comparison_report(results)
        folds = {n: res.fold for n, res in results.items()}
        if not as_json:
            click.echo(f"## {title}: {workers} workers, profile {profile}\n\n{markdown_table(report)}")
        if msg is not None:
            click.echo(f"warning: {msg}", err=True)
        if churn.churns or churn.joins:
            for name, res in results.items():
                click.echo(f"note: {name}: {res.churn_events} {churn.kind}(s), {len(churn.join_at_s)} join(s); "
                           f"{res.retried} request(s) routed again, {res.failed} failed (WORKER_DIED)", err=True)
    wall_s = time.perf_counter() - t0
    text = to_json(report)
    if as_json:
        click.echo(text)
    if out_path:
        Path(out_path).write_text(text + "\n")
    if plots_dir:
        from sim import plots

        out = Path(plots_dir)
        out.mkdir(parents=True, exist_ok=True)
        if goodput:
            fig = plots.goodput(report, title=f"{title}: goodput at TTFT p99 ≤ {slo_ttft_p99:g} s")
            fig.savefig(out / "goodput.png", dpi=120)
        else:
            plots.ttft_cdf(folds, title=f"TTFT CDF: {title}").savefig(out / "ttft_cdf.png", dpi=120)
            fig = plots.over_time(folds, kv_policy=policies[0], title=f"{title}: hit rate and load over time")
            fig.savefig(out / "over_time.png", dpi=120)
        if rate_sweep:
            plots.rate_sweep(report["sweep"], title=f"{title}: TTFT vs rate").savefig(out / "rate_sweep.png", dpi=120)
        click.echo(f"plots written to {out}/", err=True)
    click.echo(f"simulated in {wall_s:.2f} s wall", err=True)


COMMANDS = [sim_command]
