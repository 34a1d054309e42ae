"""The words for the Redis mirror's health, shared by the router that measures it
(``router/mirror_health.py``) and the views that show it (monitor, ``kvr dash``, ``kvr inspect``).

``ok``, or ``degraded`` with one :class:`Cause`; :func:`describe` renders a
:class:`~bus.schema.MirrorStatus` (or its dict form in a stats snapshot, a dump or Redis) as the
one line every view prints.
"""

from __future__ import annotations

import enum
import time
from typing import Any

from bus.schema import MirrorStatus

OK = "ok"
DEGRADED = "degraded"


class Cause(enum.StrEnum):
    UNREACHABLE = "unreachable"
    OUT_OF_MEMORY = "out_of_memory"
    AUTH = "auth"
    OTHER = "other"


def describe(status: MirrorStatus | dict[str, Any] | None) -> str:
    """One line for people: ``ok``, or ``degraded (out_of_memory since 2024-05-01 12:00:03 UTC, 12 failed writes)``."""
    if status is None:
        return "unknown"
    if isinstance(status, dict):  # a stats snapshot, a dump or Redis's JSON (may hold more keys)
        status = MirrorStatus(**{k: status[k] for k in MirrorStatus.__struct_fields__ if k in status})
    if status.state == OK:
        return OK
    since = "" if status.since_s is None else " since " + time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                        time.gmtime(status.since_s))
    return f"{status.state} ({status.cause}{since}, {status.failed_writes} failed writes)"


def as_dict(status: MirrorStatus) -> dict[str, Any]:
    return {"state": status.state, "cause": status.cause, "since_s": status.since_s,
            "failed_writes": status.failed_writes}
