"""What a ``meshtrust agent`` process loads: modules it does not need stay out, since each
costs the agent resident memory for its whole life (benchmarks/agent.py, phase 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# The modules `meshtrust agent` imports before it reads any file: the CLI group, the command,
# the agent.
_AGENT_IMPORTS = "import meshtrust.cli.main, meshtrust.cli.agent, meshtrust.agent"


def _agent_modules() -> set[str]:
    code = f"import json, sys\n{_AGENT_IMPORTS}\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(out.stdout))


@pytest.fixture(scope="module")
def agent_modules() -> set[str]:
    return _agent_modules()


@pytest.mark.parametrize(
    ("module", "why"),
    [
        ("yaml", "the config layer parses YAML only when a file is read (about 1 MB)"),
        ("zipfile", "the .pb descriptors are read by path, not with importlib.resources"),
        ("importlib.resources", "the .pb descriptors are read by path (with zipfile 0.7 MB)"),
    ],
)
def test_agent_does_not_load(agent_modules: set[str], module: str, why: str) -> None:
    assert module not in agent_modules, why
