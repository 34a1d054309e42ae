"""The ``--engine vllm`` options of ``kvr worker`` (kept here so ``cli/worker.py`` stays the emulated worker's).

``vllm_options`` adds the options (skipping any the command already has, e.g. ``--block-size``);
``split_vllm_options`` takes them out of the command's keyword arguments; ``make_vllm_runner``
builds the runner from both. Options the two engines share (``--id``, ``--router``,
``--replay-endpoint``, ``--topic``, ``--advertise-host``, ``--model``, ``--tokenizer``,
``--num-gpu-blocks``, ``--heartbeat-interval``, ``--profile``) keep their meaning; where their
default only makes sense for the emulated worker it is ignored unless given explicitly.
"""

from __future__ import annotations

from typing import Any

import click
from click.core import ParameterSource

_ENGINES = ("emulated", "vllm")

_OPTIONS = [
    click.option("--engine", type=click.Choice(_ENGINES), default="emulated", show_default=True,
                 envvar="KVR_ENGINE", help="emulated: kvr's vLLM emulator; vllm: forward to a real vLLM server."),
    click.option("--vllm-url", default=None, envvar="KVR_VLLM_URL",
                 help="[vllm] The vLLM server's HTTP base URL, e.g. http://vllm-a:8000."),
    click.option("--kv-events-endpoint", default=None, envvar="KVR_KV_EVENTS_ENDPOINT",
                 help="[vllm] The 'endpoint' of vLLM's --kv-events-config, verbatim (tcp://*:5557: vLLM binds, "
                      "the router dials it; tcp://<router>:5557: vLLM dials a router that binds)."),
    click.option("--dp-size", default=1, show_default=True, type=click.IntRange(1, 1024),
                 help="[vllm] vLLM's --data-parallel-size (rank r publishes on both ports + r)."),
    click.option("--block-size", default=16, show_default=True, type=click.IntRange(1),
                 help="Tokens per KV block, as the router was told ([vllm] checked against the server; the "
                      "emulated engine uses its profile's)."),
    click.option("--vllm-api-key", default=None, envvar="KVR_VLLM_API_KEY", help="[vllm] Bearer token for vLLM's API."),
    click.option("--ignore-eos", is_flag=True, help="[vllm] Generate exactly max_tokens (like the emulator)."),
    click.option("--startup-timeout", default=600.0, show_default=True, type=float,
                 help="[vllm] Seconds to wait for the server's /health (model loading)."),
]
_OWN = ("engine", "vllm_url", "kv_events_endpoint", "dp_size", "vllm_api_key", "ignore_eos", "startup_timeout")


_added: set[str] = set()  # shared-looking options this module had to add (popped by split_vllm_options)


def vllm_options(command_func):
    """Add the vLLM options; apply it *below* ``@click.command`` so it sees the other options."""
    have = {p.name for p in getattr(command_func, "__click_params__", [])}
    for option in reversed(_OPTIONS):
        name = option(lambda: None).__click_params__[0].name
        if name not in have:
            command_func = option(command_func)
            if name not in _OWN:
                _added.add(name)
    return command_func


def split_vllm_options(opts: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Remove the vLLM-only options from ``opts`` (in place); returns ``(engine, those options)``."""
    own = {name: opts.pop(name) for name in (*_OWN, *sorted(_added)) if name in opts}
    return own.get("engine", "emulated"), own


def _given(name: str) -> bool:
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return True
    source = ctx.get_parameter_source(name)
    return source is not None and source not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def make_vllm_runner(opts: dict[str, Any], own: dict[str, Any]):
    """The runner of ``kvr worker --engine vllm`` (raises ``click.UsageError`` / ``StartupError``)."""
    from worker.vllm.runner import VllmWorkerOptions, VllmWorkerRunner

    if not own.get("vllm_url") or not own.get("kv_events_endpoint"):
        raise click.UsageError("--engine vllm needs --vllm-url and --kv-events-endpoint")
    if opts.get("http_port") is not None:
        raise click.UsageError("--http-port is for the emulated worker; the vLLM server serves its own HTTP API")

    def shared(name: str, default: Any = None) -> Any:
        return opts.get(name) if name in opts and _given(name) else default

    replay = shared("replay_endpoint")
    options = VllmWorkerOptions(
        worker_id=opts["worker_id"], vllm_url=own["vllm_url"], kv_events_endpoint=own["kv_events_endpoint"],
        router_endpoint=opts.get("router_endpoint"),
        replay_endpoint=None if replay in (None, "", "none") else replay,
        topic=opts.get("topic") or "", dp_size=own.get("dp_size", 1),
        block_size=own.get("block_size", opts.get("block_size", 16)),
        model=shared("model"), num_gpu_blocks=opts.get("num_gpu_blocks"), advertise_host=shared("advertise_host"),
        tokenizer=opts.get("tokenizer"), api_key=own.get("vllm_api_key"), ignore_eos=own.get("ignore_eos", False),
        startup_timeout_s=own.get("startup_timeout", 600.0), heartbeat_interval_s=opts.get("heartbeat_interval", 1.0),
        profile=shared("profile", "") or "")
    return VllmWorkerRunner(options)
