"""The ``meshtrust`` command line."""

from meshtrust.cli.main import cli, main

__all__ = ["cli", "main"]
