"""``kvr worker``: one emulated vLLM worker on the router link, with vLLM's KV events and HTTP API."""

from __future__ import annotations

import logging
import signal
import sys

import click

from bus import names
from cli._vllm import make_vllm_runner, split_vllm_options, vllm_options
from cli.bind import bind_host_option, default_advertise_host, tcp_endpoint, warn_exposed
from cli.ready import announce_ready, clear_ready_file, ready_file_option
from core.liveness import DEFAULT_INTERVAL_S

logger = logging.getLogger(__name__)


@click.command("worker")
@vllm_options  # --engine vllm and its options (cli/_vllm.py)
@click.option("--id", "worker_id", required=True, envvar="KVR_WORKER_ID", help="Worker id (unique in the fleet).")
@click.option("--router", "router_endpoint", default=f"tcp://127.0.0.1:{names.ROUTER_WORKERS_PORT}", show_default=True,
              envvar="KVR_ROUTER",
              help="The router's worker endpoint (kvr router --bind-workers); several, comma-separated, for "
                   "router replicas sharing the fleet (each needs its own --router-id). "
                   "'none' runs without a router (HTTP only).")
@bind_host_option
@click.option("--events-endpoint", default=None, show_default="tcp://<bind-host>:0",
              help="KV-event PUB endpoint (bound; port 0 picks one). With --events-dial the worker dials out "
                   "to a router that binds it, like vLLM's central mode.")
@click.option("--events-dial", is_flag=True, help="Connect the PUB out instead of binding it.")
@click.option("--replay-endpoint", default=None, show_default="tcp://<bind-host>:0",
              help="vLLM replay ROUTER endpoint (always bound); 'none' disables replay.")
@click.option("--topic", default="", show_default="'', vLLM's",
              help="KV-event topic (llm-d's convention: kv@<id>@<model>).")
@click.option("--advertise-host", default=None, show_default="<bind-host>; this host's name if that is 0.0.0.0",
              help="Host the router dials to reach this worker's bound sockets.")
@click.option("--profile", default="simple", show_default=True, help="Engine profile (see `kvr profiles`).")
@click.option("--model", default="kvr-emulated", show_default=True, help="Served model name.")
@click.option("--speedup", default=1.0, show_default=True, type=float,
              help="Run engine time this many times faster than wall time.")
@click.option("--seed", default=None, type=int, help="Engine rng seed (output tokens, drawn lengths, faults).")
@click.option("--tokenizer", default=None, help="A tokenizer.json (needs the 'tokenizers' package); default: built-in.")
@click.option("--num-gpu-blocks", default=None, type=int, help="Override the profile's KV capacity (blocks).")
@click.option("--max-num-seqs", default=None, type=int, help="Override the profile's max running requests.")
@click.option("--max-num-batched-tokens", default=None, type=int, help="Override the profile's token budget per step.")
@click.option("--max-model-len", default=None, type=click.IntRange(1),
              help="Longest prompt + output in tokens (vLLM's --max-model-len); default: the profile's, at most "
                   "what the KV cache holds.")
@click.option("--stream-interval", default=1, show_default=True, type=click.IntRange(1),
              help="Tokens per streamed chunk after the first (vLLM's --stream-interval); more = fewer messages.")
@click.option("--hash-algo", default=None, type=click.Choice(["vllm-sha256", "vllm-sha256-cbor", "xxh3_128", "sha256"]),
              help="Engine block hash: vLLM's sha256 (default) or sha256_cbor "
                   "(its --prefix-caching-hash-algo), or a seeded one.")
@click.option("--lora-modules", default=None,
              help="Comma-separated LoRA adapter names served over HTTP (model = adapter).")
@click.option("--no-prefix-caching", is_flag=True, help="Disable prefix caching (no hits, no events).")
@click.option("--http-port", default=None, type=int,
              help="Serve vLLM's OpenAI-compatible HTTP API on this port (0 = pick).")
@click.option("--http-host", default=None, show_default="<bind-host>", help="HTTP bind address.")
@click.option("--heartbeat-interval", default=DEFAULT_INTERVAL_S, show_default=True, type=float,
              help="Seconds between heartbeats (until the router's Welcome says otherwise).")
@click.option("--fault-drop", default=0.0, type=float,
              help="Fraction of KV-event batches not sent live (still replayable).")
@click.option("--fault-duplicate", default=0.0, type=float, help="Fraction of batches sent twice.")
@click.option("--fault-reorder", default=0.0, type=float, help="Fraction of batches sent after the next one.")
@click.option("--fault-delay", default=0.0, type=float, help="Fraction of batches held back --fault-delay-ms.")
@click.option("--fault-delay-ms", default=50.0, show_default=True, type=float)
@click.option("--events-hwm", default=100_000, show_default=True, type=click.IntRange(1),
              help="KV-event PUB high-water mark, batches queued per subscriber before ZMQ drops them for it "
                   "(vLLM's kv-events-config 'hwm'); dropped batches stay replayable.")
@click.option("--events-sndbuf", default=0, show_default=True, type=click.IntRange(0),
              help="KV-event PUB kernel send buffer per subscriber, bytes (0: the OS's). With a small "
                   "--events-hwm, a subscriber that stops reading overflows within seconds (fault tests).")
@click.option("--restart-publisher-every", default=0.0, type=float,
              help="Restart the KV-event publisher (seq back to 0) every N wall seconds.")
@click.option("--curve-dir", default=None, envvar="KVR_CURVE_DIR", type=click.Path(file_okay=False),
              help="CURVE keys (kvr keys): authenticate and encrypt the router link and the KV-event sockets "
                   "(docs/security.md). Needs NAME.key_secret and router.key there.")
@click.option("--curve-key", default="worker", show_default=True, envvar="KVR_CURVE_KEY",
              help="Name of this worker's key pair in --curve-dir.")
@ready_file_option
@click.option("--clear-cache-every", default=0.0, type=float,
              help="Reset the prefix cache (AllBlocksCleared; running requests are preempted) every N wall seconds.")
def worker_cmd(**opts) -> None:
    """Run one emulated vLLM worker: registers with the router, runs requests, publishes KV events."""
    from worker.runner import WorkerOptions, WorkerRunner

    engine, vllm_opts = split_vllm_options(opts)
    ready_file = opts.pop("ready_file")
    clear_ready_file(ready_file)
    bind_host = opts.pop("bind_host")
    emulated = engine == "emulated"
    if emulated:  # what the emulated worker binds (the vLLM server binds its own sockets)
        for name in ("events_endpoint", "replay_endpoint"):
            if opts[name] is None:
                opts[name] = tcp_endpoint(bind_host, 0)
        if opts["http_host"] is None:
            opts["http_host"] = bind_host
        if opts["advertise_host"] is None:
            opts["advertise_host"] = default_advertise_host(bind_host)
    elif opts.pop("max_model_len") is not None:
        raise click.UsageError("--max-model-len is for the emulated worker; the vLLM server takes its own")
    try:
        if engine == "vllm":
            curve_dir, curve_key = opts.pop("curve_dir"), opts.pop("curve_key")
            runner = make_vllm_runner(opts, vllm_opts)
            if curve_dir:
                # Only the router link: vLLM's own event PUB cannot do CURVE (docs/security.md).
                from bus.security import load_curve

                runner.service.curve = load_curve(curve_dir, name=curve_key)
        else:  # --block-size (shared with --engine vllm) sets the emulated engine's block size too
            runner = WorkerRunner(WorkerOptions(block_size=vllm_opts.get("block_size"),
                                                dp_size=vllm_opts.get("dp_size", 1), **opts))
    except click.UsageError:
        raise
    except Exception as exc:  # start-up errors: one clear line, non-zero exit
        raise click.ClickException(f"worker failed to start: {exc}") from None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: runner.stop())
    # Bound in the constructors (the HTTP server listens already and serves once run() starts).
    endpoints = runner.bound_endpoints() if emulated else {}
    warn_exposed(f"worker {opts['worker_id']}", endpoints,  # CURVE covers the event sockets, never HTTP
                 authenticated=[n for n in endpoints if n != "http"] if emulated and opts["curve_dir"] else ())
    announce_ready(component="worker", component_id=opts["worker_id"], endpoints=endpoints, ready_file=ready_file)
    try:
        runner.run()
    finally:
        clear_ready_file(ready_file)
    if runner.service.refused:
        click.echo(f"router refused this worker: {runner.service.refused}", err=True)
        sys.exit(2)


COMMANDS = [worker_cmd]
