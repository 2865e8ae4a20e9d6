"""The front door: a short README whose set-up commands come first and are the ones CI runs,
and documentation whose every link resolves inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold commands, not links
    return LINK.findall(text)


def test_readme_is_short_and_starts_with_the_two_set_up_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 12_000
    commands = re.findall(r"^    (\S.*)$", text, flags=re.M)[:2]  # the first two indented command lines
    assert "toolchain export" in commands[0] and "pip install -e ." in commands[0]
    assert "pytest" in commands[1] and "pip install -e '.[test]'" in commands[1]
    # CI runs the README's test command (with quiet pip and the data path as its default).
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -e '.[test]'" in ci and ".venv/bin/python -m pytest -q" in ci
    assert commands[1].endswith(".venv/bin/python -m pytest -q")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(page):
    for target in _links(page):
        assert "://" not in target and not target.startswith("/"), f"{target}: outside the repository"
        path = target.split("#", 1)[0]
        if not path:
            continue  # an anchor within the page
        resolved = (page.parent / path).resolve()
        assert resolved.is_relative_to(ROOT), f"{target}: outside the repository"
        assert resolved.exists(), f"{target}: no such file"


def test_the_link_finder_finds_links():
    """The check above would pass on pages with no links found: the README links the docs."""
    assert any("docs/cli.md" in t for t in _links(ROOT / "README.md"))
    assert len([t for page in PAGES for t in _links(page)]) > 20


def test_the_cli_reference_names_every_command_and_flag():
    """docs/cli.md is the contract: every command and every option of today's CLI is in it."""
    from toolchain.cli import cli
    text = (ROOT / "docs" / "cli.md").read_text().split("## Planned")[0]  # what is built, not what is planned
    for name, command in cli.commands.items():
        assert f"toolchain {name}" in text, name
        for param in command.params:
            for flag in param.opts:
                if flag.startswith("--") and flag != "--help":
                    assert flag in text, f"{name} {flag}"
