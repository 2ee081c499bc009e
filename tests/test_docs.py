"""Documentation a user needs lives in the repository, and its links lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *REPO.glob("examples/*/*.md")]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_links_stay_inside_the_repository_and_resolve(doc: Path) -> None:
    text = doc.read_text()
    assert "../shared" not in text, f"{doc.name} points outside the repository"
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https://..., mailto:
            continue
        resolved = (doc.parent / target).resolve()
        assert resolved.exists(), f"{doc.name}: link to {target} leads nowhere"
        assert resolved.is_relative_to(REPO), f"{doc.name}: link to {target} leaves the repo"


def test_the_readme_says_which_platforms_and_the_license_is_there() -> None:
    readme = (REPO / "README.md").read_text()
    assert "## Platforms" in readme and "Linux" in readme
    assert "Apache License" in (REPO / "LICENSE").read_text()
