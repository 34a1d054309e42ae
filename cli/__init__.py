"""The ``kvr`` command line (click). Packages below the CLI never import click."""
