"""Every Redis key, ZMQ topic and default port kvr uses, built here and only here.

Redis schema (``{ns}`` is the namespace, default ``default``; ``{wid}`` a worker
id; ``{rank}`` a data-parallel rank; a *target* is ``{wid}:{rank}``). All values
are readable with ``redis-cli``::

    kvr:{ns}:workers                       SET    worker ids currently registered
    kvr:{ns}:worker:{wid}                  HASH   the worker's Hello (model, block_size, num_gpu_blocks,
                                                  events_endpoint, replay_endpoint, topic, dp_size,
                                                  http_url, profile, engine, epoch, registered_s)
    kvr:{ns}:worker:{wid}:alive            STRING epoch; expires heartbeat_interval × liveness after
                                                  the last heartbeat (liveness = key exists)
    kvr:{ns}:worker:{wid}:load             HASH   last heartbeat load (running, waiting,
                                                  queued_prefill_tokens, kv_usage, num_free_blocks, t_s)
    kvr:{ns}:target:{wid}:{rank}:stream    HASH   seq (last applied event batch), epoch (incarnation the
                                                  seq belongs to), updated_s, batches, events
    kvr:{ns}:target:{wid}:{rank}:blocks    HASH   field = external block hash (decimal uint64),
                                                  value = kvr block hash (decimal uint64): the prefix-index
                                                  mirror; HLEN = blocks the target holds
    kvr:{ns}:hash-scheme                   STRING the definition of the kvr block hashes stored in the
                                                  blocks hashes (core.own_block_hash.HASH_SCHEME); a router whose
                                                  scheme differs (or finds blocks without it: scheme 1)
                                                  deletes every target's blocks and stream instead of
                                                  loading them, then writes its own (routers of different
                                                  schemes must not share a namespace)
    kvr:{ns}:routers                       HASH   router id → last seen (wall s), refreshed every second
    kvr:{ns}:mirror-health                 HASH   router id → JSON of its mirror health (state, cause,
                                                  since_s, failed_writes, t_s: router/mirror_health.py),
                                                  refreshed every second while Redis takes writes
    kvr:{ns}:generation                    STRING a random token set (NX) by the first router to see
                                                  this Redis data set; a router that finds it missing
                                                  or changed knows Redis restarted empty or was
                                                  flushed, and rewrites its whole mirror

A router warm-starts by reading every ``target:*:blocks`` and ``:stream`` (the
snapshot), then applies only event batches newer than the stored ``seq`` of the
same ``epoch`` (zguide Clone pattern). Writes for one event batch go in one pipeline.

ZMQ topics (PUB/SUB byte prefixes)::

    (empty)                                a worker's KV-event topic: vLLM's default, and the emulated
                                           worker's (kvr worker --topic sets one, e.g. llm-d's
                                           kv@{wid}@{model}); the router subscribes to each worker's
                                           endpoint on its own socket, so topics need not differ
    kvr.metrics.request                    RequestRecord, published by the router
    kvr.metrics.worker                     WorkerSample, published by the router
"""

from __future__ import annotations

KEY_PREFIX = "kvr"

# The router's default ports (kvr router --bind-clients / --bind-workers / --bind-metrics), on
# loopback unless --bind-host says otherwise (cli/bind.py).
ROUTER_CLIENTS_PORT = 5555
ROUTER_WORKERS_PORT = 5556
ROUTER_METRICS_PORT = 5557

METRICS_TOPIC_PREFIX = b"kvr.metrics."
REQUEST_METRICS_TOPIC = b"kvr.metrics.request"
WORKER_METRICS_TOPIC = b"kvr.metrics.worker"


def _base(namespace: str) -> str:
    if not namespace or ":" in namespace:
        raise ValueError(f"namespace must be non-empty and contain no ':', got {namespace!r}")
    return f"{KEY_PREFIX}:{namespace}"


def workers_key(namespace: str) -> str:
    return f"{_base(namespace)}:workers"


def worker_key(namespace: str, worker_id: str) -> str:
    return f"{_base(namespace)}:worker:{worker_id}"


def worker_alive_key(namespace: str, worker_id: str) -> str:
    return f"{worker_key(namespace, worker_id)}:alive"


def worker_load_key(namespace: str, worker_id: str) -> str:
    return f"{worker_key(namespace, worker_id)}:load"


def target_name(worker_id: str, dp_rank: int) -> str:
    return f"{worker_id}:{dp_rank}"


def target_stream_key(namespace: str, worker_id: str, dp_rank: int) -> str:
    return f"{_base(namespace)}:target:{target_name(worker_id, dp_rank)}:stream"


def target_blocks_key(namespace: str, worker_id: str, dp_rank: int) -> str:
    return f"{_base(namespace)}:target:{target_name(worker_id, dp_rank)}:blocks"


def target_pattern(namespace: str, suffix: str) -> str:
    """SCAN pattern over every target's ``suffix`` key (``stream`` or ``blocks``)."""
    return f"{_base(namespace)}:target:*:{suffix}"


def parse_target_key(namespace: str, key: str | bytes) -> tuple[str, int]:
    """``kvr:{ns}:target:{wid}:{rank}:{suffix}`` → ``(wid, rank)``."""
    if isinstance(key, bytes):
        key = key.decode()
    body = key[len(_base(namespace)) + len(":target:") :]
    target, _, _suffix = body.rpartition(":")
    worker_id, _, rank = target.rpartition(":")
    return worker_id, int(rank)


def hash_scheme_key(namespace: str) -> str:
    return f"{_base(namespace)}:hash-scheme"


def routers_key(namespace: str) -> str:
    return f"{_base(namespace)}:routers"


def mirror_health_key(namespace: str) -> str:
    return f"{_base(namespace)}:mirror-health"


def generation_key(namespace: str) -> str:
    return f"{_base(namespace)}:generation"
