"""The README's recipe reference is generated from the schema; this keeps the two in sync."""

from __future__ import annotations

from pathlib import Path

from compilekit.cli import reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_reference_matches_schema():
    text = README.read_text(encoding="utf-8")
    start, end = "<!-- reference:start -->\n", "<!-- reference:end -->"
    embedded = text[text.index(start) + len(start):text.index(end)]
    assert embedded == reference_markdown(), "README is stale: regenerate with `compilekit recipe reference`"


def test_readme_quick_start_commands_exist():
    text = README.read_text(encoding="utf-8")
    assert "./dev compile" in text and "./dev test" in text
    root = README.parent
    assert (root / "dev").stat().st_mode & 0o111 and (root / ".ci" / "run").stat().st_mode & 0o111
    assert "./dev test" in (root / ".ci" / "run").read_text()
