"""Routing policies behind one interface (``base.RoutingPolicy``), chosen by name.

``get_policy("kvr", block_size=16, latency=model)`` builds one; options a policy does not take
are ignored, so a caller can pass the same common options (``block_size``, ``latency``) to any.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from core.policies.base import (
    Decision,
    LatencyModel,
    LinearPrefillModel,
    RouteRequest,
    RoutingPolicy,
    WorkerLoad,
    WorkerState,
)
from core.policies.chwbl import ChwblPolicy
from core.policies.dynamo import DynamoPolicy
from core.policies.kvr import KvrPolicy
from core.policies.llmd import LlmdPolicy
from core.policies.sglang import SglangCacheAwarePolicy
from core.policies.sglang_router import SglangRouterPolicy
from core.policies.simple import LeastLoadedPolicy, RandomPolicy, RoundRobinPolicy
from core.policies.vllm_kv_aware import VllmKvAwarePolicy

_REGISTRY: dict[str, Callable[..., RoutingPolicy]] = {
    "kvr": KvrPolicy,
    "round_robin": RoundRobinPolicy,
    "random": RandomPolicy,
    "least_loaded": LeastLoadedPolicy,
    "chwbl": ChwblPolicy,
    "sglang": SglangCacheAwarePolicy,
    "sglang_router": SglangRouterPolicy,
    "dynamo": DynamoPolicy,
    "llmd": LlmdPolicy,
    "vllm_kv_aware": VllmKvAwarePolicy,
}

#: Every policy name, the default first.
POLICY_NAMES: tuple[str, ...] = tuple(_REGISTRY)
DEFAULT_POLICY = "kvr"


def get_policy(name: str, **config: Any) -> RoutingPolicy:
    """A new policy instance; ``config`` keys the policy does not accept are dropped."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}") from None
    accepted = inspect.signature(cls).parameters  # the constructor's, less self
    return cls(**{k: v for k, v in config.items() if k in accepted})


__all__ = [
    "DEFAULT_POLICY",
    "POLICY_NAMES",
    "ChwblPolicy",
    "Decision",
    "DynamoPolicy",
    "KvrPolicy",
    "LatencyModel",
    "LeastLoadedPolicy",
    "LinearPrefillModel",
    "LlmdPolicy",
    "RandomPolicy",
    "RouteRequest",
    "RoundRobinPolicy",
    "RoutingPolicy",
    "SglangCacheAwarePolicy",
    "SglangRouterPolicy",
    "VllmKvAwarePolicy",
    "WorkerLoad",
    "WorkerState",
    "get_policy",
]
