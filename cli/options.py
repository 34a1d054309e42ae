"""Shared CLI options and the one place logging is configured."""

from __future__ import annotations

import logging
import sys

import click

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once, for the whole process (stderr)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())


def redis_url_option(func):
    """``--redis-url`` / ``KVR_REDIS_URL``; empty means the embedded default."""
    return click.option(
        "--redis-url",
        envvar="KVR_REDIS_URL",
        default="",
        show_default=False,
        help="Redis URL (redis://, rediss://, with AUTH in the URL). "
             "Default: embedded (redis-server if on PATH, else fakeredis).",
    )(func)


def namespace_option(func):
    """``--namespace`` / ``KVR_NAMESPACE``: prefix of every Redis key after ``kvr:``."""
    return click.option(
        "--namespace", envvar="KVR_NAMESPACE", default="default", show_default=True, help="Redis key namespace."
    )(func)


def load_curve_option(curve_dir: str | None, name: str):
    """The CURVE keys ``--curve-dir`` names (``bus/security.py``), or None without it; a bad key
    directory is the command's one-line error."""
    if not curve_dir:
        return None
    from bus.security import SecurityError, load_curve

    try:
        return load_curve(curve_dir, name=name)
    except SecurityError as exc:
        raise click.ClickException(str(exc)) from None
