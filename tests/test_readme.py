"""The README's recipe reference is generated from the schema; keep them in step."""

from __future__ import annotations

from pathlib import Path

from flows.cli.recipe_reference import reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_recipe_reference_matches_the_schema():
    assert reference_markdown() in README.read_text(encoding="utf-8"), (
        "README.md's recipe reference is stale: paste the output of `gptpipe config --reference`"
    )
