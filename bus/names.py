"""Every Redis key, ZMQ topic and default port kvr uses, built here and only here.

Redis schema, key layout 2 (``<ns>`` is the namespace, default ``default``; ``<wid>`` a worker
id; ``<rank>`` a data-parallel rank; a *target* is ``<wid>:<rank>``). Braces are literal: they
are Redis Cluster *hash tags* (only the text between the first ``{`` and the next ``}`` picks a
key's slot). All values are readable with ``redis-cli``::

    kvr:{<ns>}:workers                     SET    worker ids currently registered
    kvr:{<ns>}:worker:<wid>                HASH   the worker's Hello (model, block_size, num_gpu_blocks,
                                                  events_endpoint, replay_endpoint, topic, dp_size,
                                                  http_url, profile, engine, epoch, registered_s)
    kvr:{<ns>}:worker:<wid>:alive          STRING epoch; expires heartbeat_interval × liveness after
                                                  the last heartbeat (liveness = key exists)
    kvr:{<ns>}:worker:<wid>:load           HASH   last heartbeat load (running, waiting,
                                                  queued_prefill_tokens, kv_usage, num_free_blocks, t_s)
    kvr:{<ns>}:routers                     HASH   router id → last seen (wall s), refreshed every second
    kvr:{<ns>}:mirror-health               HASH   router id → JSON of its mirror health (state, cause,
                                                  since_s, failed_writes, t_s: router/mirror_health.py),
                                                  refreshed every second while Redis takes writes
    kvr:{<ns>}:generation                  STRING a random token set (NX) by the first router to see
                                                  this Redis data set; a router that finds it missing
                                                  or changed knows Redis restarted empty or was
                                                  flushed, and rewrites its whole mirror
    kvr:{<ns>~<n>}:generation              STRING on a Redis Cluster, the same token once per master
                                                  instead: ``<n>`` is the smallest number whose key's
                                                  slot that master serves; the router's generation is
                                                  every master's address and token, so one master
                                                  restarting empty (or flushed), or another node
                                                  taking its slots (a failover), changes it
    kvr:{<ns>:<wid>:<rank>}:stream         HASH   seq (last applied event batch), epoch (incarnation the
                                                  seq belongs to), scheme (core.own_block_hash.HASH_SCHEME
                                                  of the hashes in :blocks), updated_s, batches, events
    kvr:{<ns>:<wid>:<rank>}:blocks         HASH   field = external block hash (decimal uint64),
                                                  value = kvr block hash (decimal uint64): the prefix-index
                                                  mirror; HLEN = blocks the target holds

Slots: the namespace's registry keys share the tag ``<ns>`` (one slot: a worker's registration,
heartbeat and the ``MGET`` of every liveness key stay single-slot commands and pipelines); each
target's two keys share the tag ``<ns>:<wid>:<rank>`` (one event batch — ``:blocks`` and
``:stream`` — is one single-slot pipeline, and a rewrite one ``MULTI``), and targets spread
over the cluster's masters. The namespace is inside the target tag so that two namespaces with
the same worker ids spread too. On a single Redis the braces are just characters.

Hash scheme: a router warm-starting finds each target's ``scheme``; a target whose scheme
differs from its own (or is missing) is deleted instead of loaded (its hashes would never equal
a request's, and later events would chain from them). Routers of different schemes must not
share a namespace.

Layout 1 (before Redis Cluster) had no hash tags: ``kvr:<ns>:workers``,
``kvr:<ns>:target:<wid>:<rank>:stream|blocks``, a namespace-wide ``kvr:<ns>:hash-scheme``. A
router of layout 2 finding layout-1 keys in its namespace at warm start *migrates* them: it
loads each layout-1 target whose scheme (the ``hash-scheme`` key) is its own, writes it in
layout 2, and deletes every ``kvr:<ns>:*`` key (the registry is rewritten by the routers as
workers say hello and heartbeat). A router of layout 1 must not share the namespace with one of
layout 2 (it would neither see nor keep up layout-2 keys).

A router warm-starts by reading every target's ``:blocks`` and ``:stream`` (the snapshot: SCAN,
on every master of a cluster), then applies only event batches newer than the stored ``seq`` of
the same ``epoch`` (zguide Clone pattern). Writes for one event batch go in one pipeline.

ZMQ topics (PUB/SUB byte prefixes)::

    (empty)                                a worker's KV-event topic: vLLM's default, and the emulated
                                           worker's (kvr worker --topic sets one, e.g. llm-d's
                                           kv@{wid}@{model}); the router subscribes to each worker's
                                           endpoint on its own socket, so topics need not differ
    kvr.metrics.request                    RequestRecord, published by the router
    kvr.metrics.worker                     WorkerSample, published by the router
    kvr.peer.load                          PeerLoad, published by the router for its replicas
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
# Router replicas' in-flight figures, on each router's metrics PUB; outside the kvr.metrics. prefix,
# so a monitor does not receive them.
PEER_LOAD_TOPIC = b"kvr.peer.load"


#: The key layout this module builds (see the schema above); layout 1 keys are migrated.
KEY_LAYOUT = 2
#: Not allowed in a namespace: ``:`` separates key parts, braces would end the hash tag, and the
#: rest are SCAN pattern characters.
_NAMESPACE_FORBIDDEN = set(":{}*?[]\\")


def check_namespace(namespace: str) -> str:
    if not namespace or _NAMESPACE_FORBIDDEN & set(namespace):
        raise ValueError(f"namespace must be non-empty and contain none of {''.join(sorted(_NAMESPACE_FORBIDDEN))!r}, "
                         f"got {namespace!r}")
    return namespace


def _base(namespace: str) -> str:
    """The prefix of the namespace's registry keys: all share the hash tag ``<ns>`` (one slot)."""
    return f"{KEY_PREFIX}:{{{check_namespace(namespace)}}}"


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


def _target_base(namespace: str, worker_id: str, dp_rank: int) -> str:
    """``kvr:{<ns>:<wid>:<rank>}``: the target's keys share this hash tag (one slot)."""
    return f"{KEY_PREFIX}:{{{check_namespace(namespace)}:{target_name(worker_id, dp_rank)}}}"


def target_stream_key(namespace: str, worker_id: str, dp_rank: int) -> str:
    return f"{_target_base(namespace, worker_id, dp_rank)}:stream"


def target_blocks_key(namespace: str, worker_id: str, dp_rank: int) -> str:
    return f"{_target_base(namespace, worker_id, dp_rank)}:blocks"


def target_pattern(namespace: str, suffix: str) -> str:
    """SCAN pattern over every target's ``suffix`` key (``stream`` or ``blocks``)."""
    return f"{KEY_PREFIX}:{{{check_namespace(namespace)}:*}}:{suffix}"


def parse_target_key(namespace: str, key: str | bytes) -> tuple[str, int]:
    """``kvr:{<ns>:<wid>:<rank>}:<suffix>`` → ``(wid, rank)`` (a worker id may hold ``:`` or braces)."""
    if isinstance(key, bytes):
        key = key.decode()
    body = key[len(KEY_PREFIX) + len(check_namespace(namespace)) + 3 :]  # after "kvr:{<ns>:"
    tagged, _, _suffix = body.rpartition(":")
    worker_id, _, rank = tagged.removesuffix("}").rpartition(":")
    return worker_id, int(rank)


def routers_key(namespace: str) -> str:
    return f"{_base(namespace)}:routers"


def mirror_health_key(namespace: str) -> str:
    return f"{_base(namespace)}:mirror-health"


def mirror_writer_key(namespace: str) -> str:
    """The router replica that writes the index mirror (a lease: its id, with a TTL it renews)."""
    return f"{_base(namespace)}:mirror-writer"


def generation_key(namespace: str) -> str:
    return f"{_base(namespace)}:generation"


def shard_generation_key(namespace: str, n: int) -> str:
    """The generation token of the master serving this key's slot (Redis Cluster; ``n`` ≥ 0)."""
    return f"{KEY_PREFIX}:{{{check_namespace(namespace)}~{n}}}:generation"


def namespace_pattern(namespace: str) -> str:
    """SCAN pattern over every key of the namespace (``redis-cli --scan --pattern``)."""
    return f"{KEY_PREFIX}:{{{check_namespace(namespace)}[}}:~]*"


# ---------------------------------------------------------------------- layout 1 (migrated)


def legacy_target_prefix(namespace: str) -> str:
    """What every layout-1 target key (``kvr:<ns>:target:<wid>:<rank>:<suffix>``) starts with."""
    return f"{KEY_PREFIX}:{check_namespace(namespace)}:target:"


def legacy_parse_target_key(namespace: str, key: str | bytes) -> tuple[str, int]:
    """Layout 1's ``kvr:<ns>:target:<wid>:<rank>:<suffix>`` → ``(wid, rank)``."""
    if isinstance(key, bytes):
        key = key.decode()
    body = key[len(legacy_target_prefix(namespace)) :]
    target, _, _suffix = body.rpartition(":")
    worker_id, _, rank = target.rpartition(":")
    return worker_id, int(rank)


def legacy_hash_scheme_key(namespace: str) -> str:
    """Layout 1's namespace-wide hash scheme (none recorded: scheme 1)."""
    return f"{KEY_PREFIX}:{check_namespace(namespace)}:hash-scheme"


def legacy_namespace_pattern(namespace: str) -> str:
    """Every layout-1 key of the namespace (no layout-2 key matches: they start ``kvr:{``)."""
    return f"{KEY_PREFIX}:{check_namespace(namespace)}:*"
