"""Synthetic workload generators, by name (``kvr sim --workload NAME``)."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from sim.workload import Workload
from sim.workloads.agentic import FanOut, FanOutConfig, ReAct, ReActConfig, TreeOfThought, TreeOfThoughtConfig
from sim.workloads.fewshot import FewShot, FewShotConfig
from sim.workloads.gsp import GeneratedSharedPrefix, GspConfig
from sim.workloads.multiturn import MultiTurnChat, MultiTurnConfig
from sim.workloads.preble import PREBLE_PRESETS, PrebleConfig, PrebleLike

#: name -> (workload class, config class, fixed config overrides)
WORKLOADS: dict[str, tuple[type[Workload], type, dict[str, Any]]] = {
    "gsp": (GeneratedSharedPrefix, GspConfig, {}),
    "multiturn": (MultiTurnChat, MultiTurnConfig, {}),
    "fewshot": (FewShot, FewShotConfig, {}),
    "tot": (TreeOfThought, TreeOfThoughtConfig, {}),
    "fanout": (FanOut, FanOutConfig, {}),
    "react": (ReAct, ReActConfig, {}),
    **{f"preble-{p}": (PrebleLike, PrebleConfig, {"preset": p}) for p in PREBLE_PRESETS},
}


def config_fields(name: str) -> dict[str, Any]:
    """Parameter names of workload ``name`` with their defaults."""
    _, cfg_cls, fixed = _lookup(name)
    return {f.name: f.default for f in dataclasses.fields(cfg_cls) if f.name not in fixed}


def make_workload(name: str, rng: random.Random, params: dict[str, Any] | None = None) -> Workload:
    """Build workload ``name``; ``params`` override config fields (strings are converted)."""
    wl_cls, cfg_cls, fixed = _lookup(name)
    kwargs: dict[str, Any] = dict(fixed)
    types = {f.name: f for f in dataclasses.fields(cfg_cls)}
    for key, value in (params or {}).items():
        key = key.replace("-", "_")
        if key not in types or key in fixed:
            raise ValueError(f"workload {name!r} has no parameter {key!r}; known: {sorted(config_fields(name))}")
        kwargs[key] = _convert(value, types[key].default)
    return wl_cls(cfg_cls(**kwargs), rng)


def _lookup(name: str):
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(sorted(WORKLOADS))}")
    return WORKLOADS[name]


def _convert(value: Any, default: Any) -> Any:
    if not isinstance(value, str):
        return value
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float) or default is None:
        try:
            return int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            return value
    return value
