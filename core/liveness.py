"""Paranoid-Pirate heartbeating (zguide ch. 4), as pure bookkeeping on explicit ``now`` values.

Both sides send a heartbeat every ``interval_s`` when they have sent nothing else, and treat
*any* message from the peer as a sign of life. A peer silent for ``interval_s × liveness`` is
dead. A side that lost its peer reconnects after a delay that doubles from ``initial_s`` up to
``max_s`` (1 s → 2 → 4 → … → 32 s) and resets after a successful reconnect.

The shell owns sockets and the clock; it calls ``seen`` on every message, ``expired`` on its
poll timeouts, and ``send_due`` / ``sent`` to pace its own heartbeats.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

DEFAULT_INTERVAL_S = 1.0
DEFAULT_LIVENESS = 3


@dataclass(frozen=True)
class HeartbeatConfig:
    interval_s: float = DEFAULT_INTERVAL_S
    liveness: int = DEFAULT_LIVENESS  # missed beats before a peer is dead

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.liveness < 1:
            raise ValueError("heartbeat interval must be > 0 and liveness >= 1")

    @property
    def timeout_s(self) -> float:
        return self.interval_s * self.liveness


class LivenessTracker:
    """Last-seen times of peers; who is dead at ``now``."""

    def __init__(self, config: HeartbeatConfig = HeartbeatConfig()) -> None:
        self.config = config
        self._last_seen: dict[Hashable, float] = {}
        self._last_sent: dict[Hashable, float] = {}

    def seen(self, peer: Hashable, now: float) -> None:
        """Any message from ``peer`` (registers it when new)."""
        self._last_seen[peer] = now

    def remove(self, peer: Hashable) -> None:
        self._last_seen.pop(peer, None)
        self._last_sent.pop(peer, None)

    def __contains__(self, peer: object) -> bool:
        return peer in self._last_seen

    def peers(self) -> list[Hashable]:
        return list(self._last_seen)

    def last_seen(self, peer: Hashable) -> float | None:
        return self._last_seen.get(peer)

    def is_alive(self, peer: Hashable, now: float) -> bool:
        last = self._last_seen.get(peer)
        return last is not None and now - last < self.config.timeout_s

    def expired(self, now: float) -> list[Hashable]:
        """Peers silent for ``interval × liveness`` or longer, oldest first; they are removed."""
        dead = sorted((t, i, p) for i, (p, t) in enumerate(self._last_seen.items())
                      if now - t >= self.config.timeout_s)
        for _, _, peer in dead:
            self.remove(peer)
        return [p for _, _, p in dead]

    def stalled(self, now: float, stalled_s: float) -> None:
        """This side could not listen for ``stalled_s`` (its own loop stopped: SIGSTOP, starvation):
        the peers' silence in that time is not theirs. Each peer's last-seen moves on by
        ``stalled_s`` (never past ``now``), so it gets the time it lost to be heard again."""
        for peer, last in self._last_seen.items():
            self._last_seen[peer] = min(now, last + stalled_s)

    def next_deadline(self) -> float | None:
        """When the next peer would be declared dead if it stays silent (None with no peers)."""
        if not self._last_seen:
            return None
        return min(self._last_seen.values()) + self.config.timeout_s

    def send_due(self, peer: Hashable, now: float) -> bool:
        """Whether our heartbeat to ``peer`` is due (nothing sent for an interval)."""
        last = self._last_sent.get(peer)
        return last is None or now - last >= self.config.interval_s

    def sent(self, peer: Hashable, now: float) -> None:
        """We sent ``peer`` something (a heartbeat or any other message)."""
        self._last_sent[peer] = now


class Backoff:
    """Reconnect delays: ``initial_s``, doubling, capped at ``max_s``; ``reset`` after success."""

    def __init__(self, *, initial_s: float = 1.0, max_s: float = 32.0) -> None:
        if initial_s <= 0 or max_s < initial_s:
            raise ValueError("backoff needs 0 < initial_s <= max_s")
        self.initial_s = initial_s
        self.max_s = max_s
        self._next = initial_s

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self._next = self.initial_s
