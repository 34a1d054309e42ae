"""Parse a `kvr` command line like the CLI would, without running anything."""

from __future__ import annotations

import click

from cli.main import main


def dry_parse(args: list[str]) -> click.Context:
    """The context of ``kvr <args>`` (raises click.UsageError)."""
    group_ctx = main.make_context("kvr", list(args), resilient_parsing=False)
    rest = [*group_ctx._protected_args, *group_ctx.args]
    name, cmd, sub_args = main.resolve_command(group_ctx, rest)
    return cmd.make_context(name, sub_args, parent=group_ctx)
