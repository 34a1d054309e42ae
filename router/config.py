"""The router's configuration: every knob of ``RouterService``, with its default, in one place.

``kvr router`` (cli/router.py) builds one from its flags; tests and ``kvr up`` build one directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bus import names
from bus.sockets import MAX_EVENT_BYTES, MAX_REQUEST_BYTES
from core.admission import AdmissionLimits
from core.blocks import DEFAULT_BLOCK_SIZE
from core.liveness import HeartbeatConfig
from core.policies import DEFAULT_POLICY
from core.trust import TrustConfig


@dataclass
class RouterConfig:
    # Loopback unless told otherwise (``kvr router --bind-host``; cli/bind.py).
    bind_clients: str = f"tcp://127.0.0.1:{names.ROUTER_CLIENTS_PORT}"
    bind_workers: str = f"tcp://127.0.0.1:{names.ROUTER_WORKERS_PORT}"
    bind_metrics: str | None = None
    policy: str = DEFAULT_POLICY
    policy_options: dict = field(default_factory=dict)
    block_size: int = DEFAULT_BLOCK_SIZE
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    request_timeout_s: float = 300.0
    max_pending: int = 4096
    max_retries: int = 2
    tentative_window_s: float = 5.0
    stats_interval_s: float = 1.0
    mirror_check_s: float = 0.25  # how often the router checks Redis is there and still holds its mirror
    housekeeping_s: float = 0.02  # liveness, heartbeats, timeouts, replay retries: at most this often
    router_id: str = "router"
    limits: AdmissionLimits = field(default_factory=AdmissionLimits)
    # Inbound frame limits (bus/sockets.py): a bigger frame drops its sender's connection.
    max_request_bytes: int = MAX_REQUEST_BYTES  # client requests and worker messages
    max_event_bytes: int = MAX_EVENT_BYTES  # KV-event batches, live and replayed
    # Closed-loop trust (core/trust.py); None: off (workers whose engine reports no cached tokens
    # would otherwise read as liars: every prediction falls short of their 0).
    trust: TrustConfig | None = field(default_factory=TrustConfig)
    # Router replicas sharing this fleet (router/peers.py): their metrics endpoints. Needs
    # bind_metrics (the replicas subscribe to it) and a router_id of its own per replica.
    peers: tuple[str, ...] = ()
