"""The ``-o json|yaml|table`` option every command with machine output shares."""

from __future__ import annotations

import json

import click
import pytest
import yaml
from click.testing import CliRunner

from meshtrust.cli import cli
from meshtrust.cli.output import emit, output_option, render
from meshtrust.mesh.check import Verdict

DOCUMENT = {"b": 1, "a": [{"z": None, "y": "ü"}], "ok": True}


@click.command()
@click.option("--name", default="x")
@output_option()
def sample(name: str, output: str) -> None:
    if output == "table":
        click.echo(f"table for {name}")
    else:
        emit({**DOCUMENT, "name": name}, output)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "table"),
        (["-o", "table"], "table"),
        (["-o", "json"], "json"),
        (["--output", "yaml"], "yaml"),
        (["--json"], "json"),
        (["--json", "-o", "json"], "json"),
    ],
)
def test_one_output_argument(args: list[str], expected: str) -> None:
    result = CliRunner().invoke(sample, ["--name", "n", *args])
    assert result.exit_code == 0, result.output
    if expected == "table":
        assert result.output == "table for n\n"
    elif expected == "json":
        assert json.loads(result.output) == {**DOCUMENT, "name": "n"}
    else:
        assert yaml.safe_load(result.output) == {**DOCUMENT, "name": "n"}


@pytest.mark.parametrize("args", [["--json", "-o", "yaml"], ["--json", "-o", "table"]])
def test_json_with_another_format_is_a_usage_error(args: list[str]) -> None:
    result = CliRunner().invoke(sample, args)
    assert result.exit_code == 2
    assert "--json and -o" in result.output


def test_unknown_format_is_refused() -> None:
    result = CliRunner().invoke(sample, ["-o", "xml"])
    assert result.exit_code == 2 and "'xml' is not one of" in result.output


def test_yaml_keeps_the_documents_order_and_text() -> None:
    text = render(DOCUMENT, "yaml")
    assert text.splitlines()[0] == "b: 1" and "ü" in text
    assert yaml.safe_load(text) == DOCUMENT
    assert json.loads(render(DOCUMENT, "json")) == DOCUMENT
    with pytest.raises(ValueError):
        render(DOCUMENT, "table")


def test_str_enums_are_their_strings_in_both_formats() -> None:
    # A check step's verdict is a StrEnum; PyYAML's safe dumper refuses it as such.
    document = {"verdict": Verdict.FAIL, "steps": [{"verdict": Verdict.PASS}]}
    expected = {"verdict": "FAIL", "steps": [{"verdict": "PASS"}]}
    assert yaml.safe_load(render(document, "yaml")) == expected
    assert json.loads(render(document, "json")) == expected


# Every command with machine output takes -o and still takes --json.
COMMANDS = [
    ["status"],
    ["check"],
    ["proxy-config", "secret"],
    ["certs", "monitor"],
    ["ca", "certs", "list"],
    ["analyze"],
    ["describe"],
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_machine_output_command_has_the_option(command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0
    assert "-o, --output [" in result.output and "json|yaml" in result.output
    assert "--json" in result.output and "docs/output.md" in result.output
