"""vLLM's threading model for the publisher: a background thread owns the sockets.

Use it when batches come from several threads or from code without a loop of its
own (demos, adapters); a worker with its own loop can own an
:class:`~bus.publisher.EventPublisher` directly.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal

from bus.publisher import EventPublisher, FaultPlan
from core.events import KVEvent

logger = logging.getLogger(__name__)

#: What the queue carries to the publisher thread, in order.
_Command = (
    tuple[Literal["events"], list[KVEvent], float]
    | tuple[Literal["restart"], None, None]
    | tuple[Literal["faults"], FaultPlan | None, None]
)


class PublisherThread:
    """vLLM's threading model: a background thread owns an :class:`EventPublisher`.

    :meth:`publish` may be called from any thread; it enqueues (blocking when
    ``max_queue_size`` batches wait, like vLLM's scheduler). The thread publishes
    in order and serves replay requests between queue reads. :meth:`close` drains
    the queue for up to ``drain_s`` seconds, then closes the sockets.
    """

    def __init__(self, *, max_queue_size: int = 100_000, drain_s: float = 1.0, **publisher_kwargs: Any) -> None:
        self._queue: queue.Queue[_Command] = queue.Queue(maxsize=max_queue_size)
        self._drain_s = drain_s
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.publisher: EventPublisher | None = None
        self._thread = threading.Thread(target=self._run, args=(publisher_kwargs,), name="kvr-zmq-publisher",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    @property
    def endpoint(self) -> str:
        return self._started().endpoint

    @property
    def replay_endpoint(self) -> str | None:
        return self._started().replay_endpoint

    def _started(self) -> EventPublisher:
        assert self.publisher is not None  # set before __init__ returns (or __init__ raised)
        return self.publisher

    def publish(self, events: Sequence[KVEvent], ts: float) -> None:
        """Queue one batch for the publisher thread."""
        self._queue.put(("events", list(events), ts))

    def restart(self) -> None:
        """Queue a publisher restart (seq back to 0, empty ring), in order with batches."""
        self._queue.put(("restart", None, None))

    def set_faults(self, faults: FaultPlan | None) -> None:
        """Queue a new fault plan (held batches are flushed first), in order with batches."""
        self._queue.put(("faults", faults, None))

    def _run(self, kwargs: dict[str, Any]) -> None:
        try:
            self.publisher = EventPublisher(**kwargs)
        except BaseException as exc:  # reported to the constructor's thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        pub = self.publisher
        try:
            while not self._stop.is_set():
                try:
                    command = self._queue.get(timeout=0.01)
                except queue.Empty:
                    pub.poll_replay(0)
                    continue
                if command[0] == "restart":
                    pub.restart()
                elif command[0] == "faults":
                    pub.flush_held()
                    pub.faults = command[1]
                else:
                    pub.publish(command[1], command[2])
                pub.poll_replay(0)
            deadline = time.monotonic() + self._drain_s
            while time.monotonic() < deadline:
                try:
                    command = self._queue.get_nowait()
                except queue.Empty:
                    break
                if command[0] == "events":
                    pub.publish(command[1], command[2])
            pub.flush_held()
        finally:
            pub.close()

    def close(self) -> None:
        """Stop the thread after draining the queue (bounded by ``drain_s``)."""
        self._stop.set()
        self._thread.join(timeout=self._drain_s + 5)
