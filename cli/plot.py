"""``kvr plot DUMP`` (PNGs of one run) and ``kvr report DUMP...`` (markdown, runs side by side)."""

from __future__ import annotations

from pathlib import Path

import click


def _load(paths):
    from monitor.dump import DumpError, load_dump

    try:
        return [load_dump(p) for p in paths]
    except DumpError as exc:
        raise click.ClickException(str(exc)) from None


@click.command("plot")
@click.argument("dump", type=click.Path(dir_okay=False), required=False)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Directory for the PNGs (default: <dump name>-plots next to the dump).")
def plot_cmd(dump: str | None, out_dir: str | None) -> None:
    """Latency, hit-rate, recovery, block-utilisation, cache-status and worker-load PNGs of one dump.

    Without DUMP: the running `kvr up`'s monitor.json (written every few seconds). A stopped
    `kvr up` keeps its run (RUN_DIR/monitor.json) under the state dir's runs/.
    """
    from cli.user_state import NoClusterError, require_cluster, runs_dir
    from monitor.plots import plot_run

    if dump is None:
        instead = f"DUMP (a stopped `kvr up` keeps RUN_DIR/monitor.json under {runs_dir()})"
        dump = require_cluster(instead=instead).get("dump")
        if not dump:
            raise NoClusterError("the running `kvr up` has no monitor (--no-monitor), so no dump; pass DUMP")
    (data,) = _load([dump])
    out = Path(out_dir) if out_dir else Path(dump).with_name(Path(dump).stem + "-plots")
    for name, path in plot_run(data, out).items():
        click.echo(f"{name:24s} {path}")


@click.command("report")
@click.argument("dumps", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="kvr-report", show_default=True,
              help="Directory for report.md and its plots.")
@click.option("--title", default="kvr run report", show_default=True)
@click.option("--label", "labels", multiple=True, help="Run labels, in DUMPS order (default: the dumps' own).")
def report_cmd(dumps: tuple[str, ...], out_dir: str, title: str, labels: tuple[str, ...]) -> None:
    """A markdown report: the results table with runs side by side (the first is the baseline), and plots."""
    from monitor.report import write_report
    from monitor.results import markdown_table, run_results, table_rows

    data = _load(dumps)
    if labels:
        if len(labels) != len(data):
            raise click.UsageError(f"{len(labels)} --label for {len(data)} dumps")
        data = [{**d, "label": label} for d, label in zip(data, labels, strict=True)]
    path = write_report(data, out_dir, title=title)
    click.echo(markdown_table(*table_rows([run_results(d) for d in data])))
    click.echo(f"\nreport: {path}")


COMMANDS = [plot_cmd, report_cmd]
