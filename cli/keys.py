"""``kvr keys DIR``: generate CURVE key pairs for router, workers and clients."""

from __future__ import annotations

import click


@click.command("keys")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", "names", multiple=True, help="Key pair names (default: router, worker, client).")
@click.option("--role", type=click.Choice(["router", "worker", "client"]), default=None,
              help="Role of every --name (default: from the name: router, worker*, client*).")
def keys_command(directory: str, names: tuple[str, ...], role: str | None) -> None:
    """Generate ZMQ CURVE key pairs (NAME.key public, NAME.key_secret secret) in DIRECTORY.

    A worker's public key is also copied into DIRECTORY/workers and a client's into
    DIRECTORY/clients: the keys `kvr router --curve-dir DIRECTORY` lets in (docs/security.md).
    """
    from bus.security import SecurityError, generate_keys

    try:
        created = generate_keys(directory, names or ("router", "worker", "client"), role=role)
    except SecurityError as exc:
        raise click.ClickException(str(exc)) from exc
    for name, path in created.items():
        click.echo(f"{name}: {path} (public key: {path.with_suffix('.key')})")
    click.echo("Keep *.key_secret private; give peers only the public *.key files.")


COMMANDS = [keys_command]
