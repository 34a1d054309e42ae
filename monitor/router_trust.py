"""Trust incidents for the monitor: each target's closed-loop trust weight, polled off the router.

The router down-weights a target whose reported cached tokens fall short of its predictions
(core/trust.py) and says so in its HTTP front's ``/metrics`` as one gauge per target::

    kvr_router_target_trust{worker="w1",dp_rank="0",confidence="resyncing"} 0.0

The metrics stream the monitor subscribes to (``WorkerSample``) does not carry the weight, so the
monitor reads that gauge: ``kvr monitor --router-http URL`` polls ``URL/metrics`` every
``interval_s`` and hands each target's weight to :meth:`MonitorState.observe_trust`, which turns
a drop or a recovery into an incident (dump, dashboard, report, incidents plot). A router that
cannot be reached is logged once per outage and polled again; its last weights stay as they were.
A router run with ``--no-trust`` reports every target at 1: no incident ever.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence

from prometheus_client.parser import text_string_to_metric_families

from monitor.state import MonitorState

logger = logging.getLogger(__name__)

TRUST_METRIC = "kvr_router_target_trust"
DEFAULT_INTERVAL_S = 1.0  # the router refreshes the stats behind /metrics once per second


def parse_target_trust(text: str) -> dict[str, float]:
    """``{target: weight}`` from a router's Prometheus text; a target is ``worker/dp_rank``
    (``WorkerKey``'s name, as the metrics stream names targets). Read with prometheus_client's
    parser (label order and escaping are the format's business); text that does not parse, and
    samples without a worker label, give nothing."""
    out: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                worker = sample.labels.get("worker")
                if sample.name == TRUST_METRIC and worker:
                    out[f"{worker}/{sample.labels.get('dp_rank') or '0'}"] = float(sample.value)
    except ValueError:  # the parser's error for malformed text
        logger.debug("unparseable router metrics text")
    return out


def fetch_target_trust(url: str, *, timeout_s: float = 1.0) -> dict[str, float]:
    """One poll of ``url`` (the router's HTTP front, e.g. ``http://127.0.0.1:8000``)."""
    with urllib.request.urlopen(f"{url.rstrip('/')}/metrics", timeout=timeout_s) as resp:
        return parse_target_trust(resp.read().decode("utf-8", "replace"))


class RouterTrustPoller:
    """Polls each router URL's trust gauges into ``state`` (under ``lock``), on a daemon thread."""

    def __init__(self, *, urls: Sequence[str], state: MonitorState, lock: threading.Lock,
                 interval_s: float = DEFAULT_INTERVAL_S, clock: Callable[[], float] = time.time,
                 fetch: Callable[[str], dict[str, float]] = fetch_target_trust) -> None:
        self.urls = list(urls)
        self.state, self.lock, self.interval_s = state, lock, interval_s
        self._clock, self._fetch = clock, fetch
        self._down: set[str] = set()  # URLs whose last poll failed (logged once per outage)
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0
        self.failures = 0

    def poll_once(self) -> None:
        for url in self.urls:
            try:
                weights = self._fetch(url)
            except OSError as exc:  # URLError, timeouts, refused: the router is away
                self.failures += 1
                if url not in self._down:
                    self._down.add(url)
                    logger.warning("router %s: trust not readable (%s); polling on", url, exc)
                continue
            if url in self._down:
                self._down.discard(url)
                logger.info("router %s: trust readable again", url)
            self.polls += 1
            now = self._clock()
            with self.lock:
                for target, weight in sorted(weights.items()):
                    self.state.observe_trust(target, weight, now)

    def start(self) -> None:
        if self._thread is None and self.urls:
            self._thread = threading.Thread(target=self._run, name="monitor-trust", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 2)
            self._thread = None

    def _run(self) -> None:
        while not self._halt.is_set():
            self.poll_once()
            self._halt.wait(self.interval_s)

