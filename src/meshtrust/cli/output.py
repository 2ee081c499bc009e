"""``-o json|yaml|table``: one output option for every command with machine output.

Each such command builds one document (a dict or list of plain values, its schema in
docs/output.md) and prints it with :func:`emit` as JSON or YAML, or draws its own table for
people. ``--json`` stays, as an alias of ``-o json`` (scripts written before ``-o`` keep
working); giving both with different formats is a usage error.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import click

__all__ = ["FORMATS", "emit", "output_option"]

FORMATS = ("table", "json", "yaml")

F = TypeVar("F", bound=Callable[..., Any])


def output_option(default: str = "table", formats: Sequence[str] = FORMATS) -> Callable[[F], F]:
    """Add ``-o/--output`` and ``--json`` to a command; it receives one ``output`` argument
    (one of ``formats``, ``default`` when neither is given)."""

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: Any, output: str | None, as_json: bool, **kwargs: Any) -> Any:
            if as_json and output not in (None, "json"):
                raise click.UsageError(f"--json and -o {output} ask for different formats")
            return command(*args, output="json" if as_json else output or default, **kwargs)

        with_json = click.option(
            "--json", "as_json", is_flag=True, help="Same as -o json (kept for scripts)."
        )(wrapper)
        described = ", ".join(formats)
        return cast(
            F,
            click.option(
                "-o",
                "--output",
                type=click.Choice(list(formats)),
                default=None,
                help=f"Output format: {described} (default {default}); the JSON and YAML "
                "documents are described in docs/output.md.",
            )(with_json),
        )

    return decorate


def render(document: Any, output: str) -> str:
    """``document`` as JSON (indented) or YAML (block style, keys in the document's order).

    YAML is written from the JSON form of the document, so both carry the same values: a
    ``str`` enum member (a check's verdict) is its string in either, where PyYAML's safe
    dumper would refuse it.
    """
    if output == "json":
        return json.dumps(document, indent=2)
    if output == "yaml":
        import yaml  # only when asked for: most commands never print YAML

        plain = json.loads(json.dumps(document))
        return yaml.safe_dump(plain, sort_keys=False, allow_unicode=True).rstrip("\n")
    raise ValueError(f"no machine format {output!r}")


def emit(document: Any, output: str) -> None:
    """Print ``document`` in ``output`` (json or yaml) to stdout."""
    click.echo(render(document, output))
