"""What Redis knows about a kvr deployment (``kvr inspect``): workers, index sizes, streams, hot prefixes.

Reads only the schema of ``bus/names.py`` through ``router/mirror.py``'s
conventions; writes nothing. The *hottest prefixes* are the kvr block hashes
held by the most targets (a shared system prompt shows up on every worker).

What Redis holds is only as good as the routers' mirror: the ``mirror`` part says whether it is
degraded (``router/mirror_health.py``), from Redis's own memory figures (at ``maxmemory`` with
``noeviction`` every write is refused: liveness keys expire and blocks go missing while the
routers route on from memory) and from each router's last health report.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import redis

from bus import names
from bus.mirror_status import DEGRADED, OK, Cause


def _s(v: bytes | str | None) -> str:
    return "" if v is None else v.decode() if isinstance(v, bytes) else v


def _num(v: bytes | str | None, cast=float, default=None):
    try:
        return cast(_s(v)) if v is not None else default
    except ValueError:
        return default


def inspect_state(client: redis.Redis, *, namespace: str, now_s: float, top: int = 10) -> dict[str, Any]:
    """A JSON-ready snapshot of the namespace (``now_s`` computes ages and lags)."""
    ns = namespace
    worker_ids = sorted(_s(w) for w in client.smembers(names.workers_key(ns)))
    workers = []
    for wid in worker_ids:
        info = {_s(k): _s(v) for k, v in client.hgetall(names.worker_key(ns, wid)).items()}
        alive = client.get(names.worker_alive_key(ns, wid))
        ttl_ms = client.pttl(names.worker_alive_key(ns, wid))
        load = {_s(k): _s(v) for k, v in client.hgetall(names.worker_load_key(ns, wid)).items()}
        workers.append({
            "worker_id": wid,
            "alive": alive is not None,
            "epoch": _num(alive, int) if alive is not None else _num(info.get("epoch"), int),
            "alive_ttl_s": ttl_ms / 1000 if ttl_ms and ttl_ms > 0 else None,
            "model": info.get("model", ""),
            "block_size": _num(info.get("block_size"), int),
            "num_gpu_blocks": _num(info.get("num_gpu_blocks"), int),
            "dp_size": _num(info.get("dp_size"), int, 1),
            "engine": info.get("engine", ""),
            "profile": info.get("profile", ""),
            "events_endpoint": info.get("events_endpoint", ""),
            "http_url": info.get("http_url", ""),
            "registered_age_s": (now_s - float(info["registered_s"])) if info.get("registered_s") else None,
            "load": {k: _num(v) for k, v in load.items()},
        })
    targets = []
    holders: Counter[int] = Counter()
    streams = {names.parse_target_key(ns, k): k
               for k in client.scan_iter(match=names.target_pattern(ns, "stream"), count=1000)}
    blocks = {names.parse_target_key(ns, k): k
              for k in client.scan_iter(match=names.target_pattern(ns, "blocks"), count=1000)}
    for target in sorted(set(streams) | set(blocks)):
        raw = {_s(k): v for k, v in client.hgetall(streams[target]).items()} if target in streams else {}
        n_blocks = client.hlen(blocks[target]) if target in blocks else 0
        updated = _num(raw.get("updated_s"))
        if target in blocks:
            # Count each kvr hash once per target (several external hashes may map to one).
            holders.update({int(own) for _, own in client.hscan_iter(blocks[target], count=10_000)})
        targets.append({
            "target": names.target_name(*target),
            "worker_id": target[0],
            "dp_rank": target[1],
            "seq": _num(raw.get("seq"), int, -1),
            "epoch": _num(raw.get("epoch"), int, 0),
            "batches": _num(raw.get("batches"), int, 0),
            "events": _num(raw.get("events"), int, 0),
            "blocks": n_blocks,
            "updated_age_s": (now_s - updated) if updated else None,
        })
    routers = {_s(k): now_s - float(_s(v)) for k, v in client.hgetall(names.routers_key(ns)).items()}
    mirror = mirror_state(client, namespace=ns, now_s=now_s)
    if mirror["state"] != OK:
        for w in workers:  # an expired liveness key says nothing while the routers cannot write it
            w["alive_unknown"] = not w["alive"]
    hottest = sorted(holders.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {
        "namespace": ns,
        "workers": workers,
        "targets": targets,
        "routers": {k: {"last_seen_age_s": v} for k, v in sorted(routers.items())},
        "distinct_blocks": len(holders),
        "indexed_blocks": sum(t["blocks"] for t in targets),
        "hottest_prefixes": [{"block_hash": f"{h:016x}", "targets": n} for h, n in hottest],
        "mirror": mirror,
    }


def mirror_state(client: redis.Redis, *, namespace: str, now_s: float) -> dict[str, Any]:
    """``state`` (ok / degraded), ``cause``, ``detail``; Redis's ``memory`` figures and each router's
    last report (``routers``: its health and ``age_s``). Redis at its memory limit wins over the
    routers' reports: they cannot write them then."""
    routers = {}
    for k, v in client.hgetall(names.mirror_health_key(namespace)).items():
        try:
            report = json.loads(_s(v))
        except ValueError:
            continue
        routers[_s(k)] = {**report, "age_s": now_s - report["t_s"] if report.get("t_s") else None}
    memory = {}
    try:
        info = _memory_info(client)
    except redis.ResponseError:  # INFO refused (an ACL user without it, a Redis-like server): reports only
        info = {}
    for key in ("used_memory", "maxmemory", "maxmemory_policy", "evicted_keys", "node"):
        if key in info:
            memory[key] = _s(info[key]) if isinstance(info[key], bytes) else info[key]
    out = {"state": OK, "cause": None, "detail": "", "memory": memory, "routers": dict(sorted(routers.items()))}
    maxmemory = int(memory.get("maxmemory") or 0)
    if maxmemory and memory.get("maxmemory_policy") == "noeviction" and int(memory.get("used_memory", 0)) >= maxmemory:
        out.update(state=DEGRADED, cause=Cause.OUT_OF_MEMORY.value,
                   detail=f"Redis uses {memory['used_memory']} of maxmemory {maxmemory} bytes (noeviction): "
                          "it refuses writes")
        return out
    if maxmemory and int(memory.get("evicted_keys") or 0):
        out["detail"] = (f"Redis evicted {memory['evicted_keys']} keys "
                         f"(maxmemory-policy {memory.get('maxmemory_policy')})")
    degraded = sorted((rid, r) for rid, r in routers.items() if r.get("state") == DEGRADED)
    if degraded:
        rid, r = degraded[0]
        out.update(state=DEGRADED, cause=r.get("cause"), detail=f"router {rid} reports it")
    return out


def _memory_info(client: redis.Redis) -> dict[str, Any]:
    """INFO memory and stats; on a Redis Cluster those of the fullest master (the first to refuse
    writes), with ``node`` naming it and ``evicted_keys`` summed over every master."""
    from bus.redis_url import is_cluster

    if not is_cluster(client):
        return {**client.info("memory"), **client.info("stats")}
    cluster: Any = client
    primaries = cluster.get_primaries()
    memory = cluster.info("memory", target_nodes=primaries)
    stats = cluster.info("stats", target_nodes=primaries)

    def fullness(node: str) -> float:
        used, limit = int(memory[node].get("used_memory", 0)), int(memory[node].get("maxmemory", 0) or 0)
        return used / limit if limit else 0.0

    node = max(sorted(memory), key=fullness)
    return {**memory[node], "node": node,
            "evicted_keys": sum(int(s.get("evicted_keys", 0)) for s in stats.values())}
