"""``kvr bench peer-agreement``: the live sglang-router against its model, request by request.

``core/policies/sglang_router.py`` models sglang-router 0.3.2's ``cache_aware``; this checks the
model against the router itself. Per seed, the peer bench's text workload (``bench/peer.py``:
shared system prompts, Poisson arrivals, or one request at a time with ``sequential``) goes through
a live ``sglang_router.launch_router --policy cache_aware`` in front of a fresh emulated fleet; each
worker names itself in an ``x-kvr-worker`` response header, which the router passes through, so
the client learns the router's choice per request. Then the same prompts, in send order, go
through a fresh :class:`SglangRouterPolicy`:

* tokens from kvr's built-in tokenizer (the workers' own), where the router's tree is over
  characters: a source of disagreement that the model owns, not the harness;
* the candidates in the router's own worker order, since both break load ties by it ("first in
  worker order"): the router's registration order, which varies between runs; :func:`probe_order`
  measures it before the drive (``GET /workers``'s order is recorded next to it);
* each worker's in-flight count at the request's send time as the client saw it live (requests
  sent earlier and not yet answered, by the worker that served them), which is the router's
  count up to the router's own forwarding delays;
* ``now`` = seconds since the first send (the eviction timer: no eviction in a run this short).

The model runs free: its tree holds its own choices, as the router's holds the router's, so one
early disagreement (say, a new prefix placed on another worker) repeats for every later request of
that prefix. Two figures separate that from a wrong rule: the agreement after the best one-to-one
relabelling of workers (does the model group the same requests together?) and the index of the
first disagreement. A request that failed (no worker header) is left out of both sequences.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import aiohttp

from bench.peer import PeerConfig, http_fleet, send_at_arrivals, start_sglang_router, text_workload
from bench.progress import NullProgress
from bench.results import SuiteResult, spread

#: The response header a kvr worker names itself in (worker/http_api.py; kvr's front sends it too).
WORKER_HEADER = "x-kvr-worker"
#: sglang-router 0.3.2's ``--cache-threshold`` default (the model's too): the router is run with it.
SGLANG_CACHE_THRESHOLD = 0.3
#: Workers up to which the best relabelling is searched exhaustively (8! = 40,320 permutations).
RELABEL_MAX_WORKERS = 8


@dataclass(frozen=True)
class Sent:
    """One request of the live drive: send and answer times (client clock, s) and who served it."""

    sent_s: float
    done_s: float
    worker: str | None  # None: the request failed, the router's choice is unknown


def in_flight_at(sent: Sequence[Sent], workers: Sequence[str]) -> list[dict[str, int]]:
    """Per request, each worker's requests in flight when it was sent: sent before it, answered after."""
    out = []
    for i, r in enumerate(sent):
        load = dict.fromkeys(workers, 0)
        for j, o in enumerate(sent):
            if j != i and o.worker is not None and o.sent_s < r.sent_s < o.done_s:
                load[o.worker] += 1
        out.append(load)
    return out


def model_choices(prompts: Sequence[str], sent: Sequence[Sent], workers: Sequence[str], *,
                  tokenizer=None, policy=None) -> list[tuple[str, str, float]]:
    """The model's ``(worker, reason, token match rate)`` per request, fed as the module docstring
    says (``workers`` in router order)."""
    from core.policies import RouteRequest, SglangRouterPolicy, WorkerLoad, WorkerState
    from core.prefix_index import WorkerKey
    from core.tokenizer import BuiltinTokenizer

    tokenizer = tokenizer or BuiltinTokenizer()
    policy = policy or SglangRouterPolicy()
    loads = in_flight_at(sent, workers)
    t0 = min((r.sent_s for r in sent), default=0.0)
    out = []
    for i, (prompt, r) in enumerate(zip(prompts, sent, strict=True)):
        ids = tokenizer.encode(prompt)
        cands = [WorkerState(WorkerKey(w, 0), 0, WorkerLoad(in_flight=loads[i][w])) for w in workers]
        matched, _ = policy.match(ids)  # changes nothing: the rate its choice is about to use
        d = policy.choose(RouteRequest(f"r{i}", len(ids), (), ids), cands, now=r.sent_s - t0, rng=None)
        out.append((d.target.worker_id, d.reason, matched / len(ids) if ids else 0.0))
    return out


def agreement(live: Sequence[str], model: Sequence[str], workers: Sequence[str]) -> dict:
    """How often ``model`` names ``live``'s worker: the rate, after the best one-to-one relabelling
    of workers, the first disagreement (``None``: none), and the confusion counts live → model."""
    if len(live) != len(model):
        raise ValueError("live and model choices must be as many")
    n = len(live)
    same = sum(a == b for a, b in zip(live, model, strict=True))
    pairs = Counter(zip(live, model, strict=True))
    best = same
    if len(workers) <= RELABEL_MAX_WORKERS:
        for perm in itertools.permutations(workers):
            relabel = dict(zip(workers, perm, strict=True))
            best = max(best, sum(c for (a, b), c in pairs.items() if relabel[a] == b))
    first = next((i for i, (a, b) in enumerate(zip(live, model, strict=True)) if a != b), None)
    return {"requests": n, "agree": same, "agreement": same / n if n else float("nan"),
            "agreement_relabelled": best / n if n else float("nan"), "first_disagreement": first,
            "confusion": {a: {b: pairs[a, b] for b in workers if pairs[a, b]} for a in workers
                          if any(pairs[a, b] for b in workers)}}


def character_match_rates(prompts: Sequence[str]) -> list[float]:
    """Per prompt, the share of its characters the router's tree matches: the longest prefix it
    shares with any earlier prompt (the tree holds every prompt routed, none evicted in a run this
    short), over its length; the router's ``match_rate``, where the model's is over tokens."""
    out = []
    for i, p in enumerate(prompts):
        best = max((len(os.path.commonprefix([p, q])) for q in prompts[:i]), default=0)
        out.append(best / len(p) if p else 0.0)
    return out


def disagreement_kind(model_reason: str, live_in_flight: int, model_in_flight: int, *,
                      token_rate_above: bool, char_rate_above: bool) -> str:
    """Why the model named another worker: ``threshold`` (its token match rate and the router's
    character match rate fall on either side of ``cache_threshold``), else, from its reason and
    the in-flight counts the client saw, ``tree`` (the model followed its tree: mostly a prefix it
    placed elsewhere earlier), ``tie`` (the least-loaded rule, both workers equally loaded: the
    tie order) or ``load`` (the least-loaded rule, the router's worker looked busier: the router's
    count differed from the client's)."""
    if model_reason.startswith("imbalanced"):  # neither match rate played a part
        return "load"
    if token_rate_above != char_rate_above:
        return "threshold"
    if "least loaded" not in model_reason:
        return "tree"
    return "tie" if live_in_flight == model_in_flight else "load"


def compare(requests: Sequence[tuple[str, Sent]], order: Sequence[str], *,
            cache_threshold: float = SGLANG_CACHE_THRESHOLD) -> tuple[dict, list[dict]]:
    """One seed's ``(summary, disagreements)``: ``requests`` are ``(prompt, Sent)`` that were served,
    in send order; ``order`` the router's tie order. The summary is :func:`agreement`'s, with the
    peak in-flight count, each side's requests per worker and the disagreements by kind."""
    sent = [r for _, r in requests]
    live = [cast(str, r.worker) for r in sent]
    decisions = model_choices([p for p, _ in requests], sent, order)
    model = [w for w, _, _ in decisions]
    loads = in_flight_at(sent, order)
    char_rates = character_match_rates([p for p, _ in requests])
    disagree = []
    for i, (lw, (mw, why, token_rate)) in enumerate(zip(live, decisions, strict=True)):
        if lw != mw:
            kind = disagreement_kind(why, loads[i][lw], loads[i][mw], token_rate_above=token_rate > cache_threshold,
                                     char_rate_above=char_rates[i] > cache_threshold)
            disagree.append({"request": i, "live": lw, "model": mw, "kind": kind, "live_in_flight": loads[i][lw],
                             "model_in_flight": loads[i][mw], "model_token_rate": round(token_rate, 4),
                             "router_char_rate": round(char_rates[i], 4), "model_reason": why})
    summary = {**agreement(live, model, order),
               "peak_in_flight": max((sum(load.values()) for load in loads), default=0),
               "live_per_worker": {w: live.count(w) for w in order},
               "model_per_worker": {w: model.count(w) for w in order},
               "kinds": dict(Counter(d["kind"] for d in disagree))}
    return summary, disagree


# ---------------------------------------------------------------------------- the live drive


async def _one(url: str, prompt: str, cfg: PeerConfig) -> Sent:
    body = {"model": "kvr-emulated", "prompt": prompt, "max_tokens": cfg.max_tokens, "stream": False}
    t0 = time.perf_counter()
    written: list[float] = []

    async def on_body_sent(*_) -> None:
        written.append(time.perf_counter())

    # Sent = when the body was written, not when the call began: a new connection costs a few ms
    # of a busy machine, and two requests must be ordered as the router received them.
    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(on_body_sent)
    worker = None
    try:
        # A new connection per request, as the peer bench (sglang-router 0.3.2 and keep-alive).
        async with asyncio.timeout(cfg.request_timeout_s), aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True), trace_configs=[trace]) as session, \
                session.post(f"{url}/v1/completions", json=body) as resp:
            await resp.read()
            if resp.status == 200:
                worker = resp.headers.get(WORKER_HEADER)
    except (aiohttp.ClientError, OSError, TimeoutError):
        pass
    return Sent(written[-1] if written else t0, time.perf_counter(), worker)


async def _drive(url: str, workload: list[tuple[float, str]], cfg: PeerConfig, sequential: bool) -> list[Sent]:
    if sequential:
        return [await _one(url, prompt, cfg) for _, prompt in workload]
    return await send_at_arrivals(workload, cfg.speedup, lambda prompt: _one(url, prompt, cfg))


#: Output tokens of an order probe: enough to keep it in flight until every probe has landed.
PROBE_MAX_TOKENS = 4096


async def probe_order(url: str, n_workers: int, timeout_s: float) -> list[str]:
    """The order in which the router breaks load ties, as worker ids.

    The router takes the least-loaded worker on a low match, the first in its worker list on ties,
    and that list is its registry's: registration order, which varies between runs. ``GET /workers``
    listed the same order in every check, but that is not its contract; this measures the order the
    rule uses. Probe ``k`` (a text no other shares a first character with: match 0)
    is held in flight while the next is sent: it lands on the first of the workers still idle,
    which spells the list out. The probes are then dropped (the workers abort them) and the router's
    loads are awaited back to zero; their texts stay in its tree, sharing no prefix with a workload
    prompt (``[group ...``)."""
    held: list[tuple[aiohttp.ClientSession, aiohttp.ClientResponse]] = []
    order: list[str] = []
    try:
        async with asyncio.timeout(timeout_s):
            for k in range(n_workers):
                session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
                body = {"model": "kvr-emulated", "prompt": f"{chr(ord('A') + k)} order probe",
                        "max_tokens": PROBE_MAX_TOKENS, "stream": True}
                resp = await session.post(f"{url}/v1/completions", json=body)
                held.append((session, resp))
                worker = resp.headers.get(WORKER_HEADER)
                if resp.status != 200 or worker is None or worker in order:
                    raise RuntimeError(f"order probe {k}: status {resp.status}, worker {worker}, so far {order}")
                order.append(worker)
    finally:
        for session, resp in held:
            resp.close()
            await session.close()
    async with asyncio.timeout(timeout_s):
        while any(w.get("load", 0) for w in await asyncio.to_thread(_router_workers, url)):
            await asyncio.sleep(0.05)
    return order


def _router_workers(url: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/workers", timeout=5.0) as resp:
        data = json.loads(resp.read())
    return data.get("workers", data) if isinstance(data, dict) else data


def live_choices(cfg: PeerConfig, workload: list[tuple[float, str]], run_dir: Path, seed: int, *,
                 sequential: bool) -> tuple[list[str], list[str], list[Sent]]:
    """(the router's tie order, the order ``GET /workers`` lists, one :class:`Sent` per request in
    workload order) of one live drive."""
    from cluster.supervisor import Supervisor

    sup = Supervisor(log_dir=run_dir / "logs")
    try:
        worker_urls = http_fleet(sup, cfg, seed)
        url = start_sglang_router(sup, cfg, "cache_aware", worker_urls)
        listed = [f"worker-{worker_urls.index(w['url'])}" for w in _router_workers(url)]
        order = asyncio.run(probe_order(url, cfg.workers, cfg.request_timeout_s))
        return order, listed, asyncio.run(_drive(url, workload, cfg, sequential))
    finally:
        sup.stop()


def run(cfg: PeerConfig, *, sequential: bool = False, command: str = "kvr bench peer-agreement",
        progress=None) -> SuiteResult:
    progress = progress or NullProgress()
    root = Path(cfg.out_dir or tempfile.mkdtemp(prefix="kvr-bench-peer-agreement-"))
    progress.start(cfg.repeats, "starting")
    rows: list[dict] = []
    disagreements: list[dict] = []
    try:
        for rep in range(cfg.repeats):
            seed = cfg.seed + rep
            workload = text_workload(cfg, seed)
            order, listed, sent = live_choices(cfg, workload, root / f"seed-{seed}", seed, sequential=sequential)
            kept = [(p, s) for (_, p), s in zip(workload, sent, strict=True) if s.worker is not None]
            row, disagree = compare(kept, order)
            rows.append({"seed": seed, "router_order": " ".join(order), "listed_order": " ".join(listed),
                         "errors": len(sent) - len(kept), **row})
            disagreements += [{"seed": seed, **d} for d in disagree]
            progress.step(f"seed {seed}: agreement {row['agreement']:.3f} (relabelled "
                          f"{row['agreement_relabelled']:.3f}, first disagreement {row['first_disagreement']})")
    finally:
        progress.close()
    result = SuiteResult("peer-agreement", command, {**asdict(cfg), "sequential": sequential})
    result.tables["seeds"] = rows
    result.tables["disagreements"] = disagreements
    s = spread(r["agreement"] for r in rows)
    result.notes.append(
        f"agreement median {s['median']:.3f} (min {s['min']:.3f}, max {s['max']:.3f}) over {len(rows)} seeds; "
        f"{cfg.workers} emulated workers at speedup {cfg.speedup:g}, {cfg.groups}×{cfg.prompts_per_group} "
        f"shared-prefix text prompts ({cfg.system_words}-word system prompts), "
        + ("one request at a time" if sequential else f"Poisson {cfg.rate_per_s:g} req/s of workload time")
        + f"; logs in {root}")
    return result


def display_tables(result: SuiteResult) -> dict[str, list[dict]]:
    def fmt(d: dict) -> str:
        return ", ".join(f"{k}:{v}" for k, v in d.items())

    return {"seeds": [{"seed": r["seed"], "requests": r["requests"], "agreement": f"{r['agreement']:.3f}",
                       "relabelled": f"{r['agreement_relabelled']:.3f}",
                       "first disagreement": r["first_disagreement"], "peak in flight": r["peak_in_flight"],
                       "router order": r["router_order"],
                       "GET /workers order": "same" if r["listed_order"] == r["router_order"] else r["listed_order"],
                       "live per worker": fmt(r["live_per_worker"]),
                       "model per worker": fmt(r["model_per_worker"]),
                       "disagreements by kind": fmt(r["kinds"]) or "-",
                       "confusion live → model": "; ".join(f"{a} → {fmt(b)}" for a, b in r["confusion"].items()),
                       "errors": r["errors"]} for r in result.tables["seeds"]]}
