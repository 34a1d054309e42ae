"""``kvr dash``: a live terminal dashboard over the monitor."""

from __future__ import annotations

import time

import click

#: What the dashboard reads of a monitor: its dump, without the raw samples.
JSON_PATH = "/json?light=1"


@click.command("dash")
@click.option("--source", default=None, envvar="KVR_MONITOR_URL",
              help=f"The monitor's /json URL (?light=1 skips the raw samples), or a dump file "
                   f"(default: the running `kvr up`'s monitor, <monitor>{JSON_PATH}).")
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts and tests).")
@click.option("--interval", "interval_s", type=float, default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--width", type=int, default=None, help="Console width (default: the terminal's).")
@click.option("--height", type=int, default=None,
              help="Lines to fit a frame in, the most important panels first "
                   "(default: the terminal's; --once: no limit).")
def dash_cmd(source: str | None, once: bool, interval_s: float, width: int | None, height: int | None) -> None:
    """Hit rate, latency by cache status, per-worker load and index health, recent requests, incidents."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from cli.up import DEFAULT_MONITOR_PORT
    from cli.user_state import NoClusterError, require_cluster
    from monitor.dashboard import fetch_dump, render_dashboard
    from monitor.dump import DumpError

    if source is None:
        compose = f"http://127.0.0.1:{DEFAULT_MONITOR_PORT}{JSON_PATH}"
        instead = f"--source URL|DUMP (or KVR_MONITOR_URL; docker compose's monitor: {compose})"
        monitor_url = require_cluster(instead=instead).get("monitor_url")
        if not monitor_url:
            raise NoClusterError(f"the running `kvr up` has no monitor (--no-monitor); pass {instead}")
        source = f"{monitor_url}{JSON_PATH}"
    console = Console(width=width)

    def layout() -> dict:
        # Read on every frame: the terminal may have been resized. Live keeps the cursor on
        # the line under the frame, so a frame of the terminal's full height would scroll it.
        live_height = height if height is not None else console.size.height - 1
        return {"width": console.size.width, "height": height if once else live_height}

    def frame():
        try:
            return render_dashboard(fetch_dump(source), **layout())
        except (OSError, ValueError, DumpError) as exc:
            return Text(f"waiting for the monitor at {source}: {exc}", style="yellow")

    if once:
        try:
            data = fetch_dump(source)
        except (OSError, ValueError, DumpError) as exc:
            raise click.ClickException(f"cannot read {source}: {exc}") from None
        console.print(render_dashboard(data, **layout()))
        return
    try:
        with Live(frame(), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval_s)
                live.update(frame())
    except KeyboardInterrupt:
        pass


COMMANDS = [dash_cmd]
