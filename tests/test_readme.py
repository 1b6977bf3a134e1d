"""The recipe reference in docs/reference.md is generated from the schema; keep them in step."""

from __future__ import annotations

from pathlib import Path

from flows.cli.recipe_reference import reference_markdown

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference.md"


def test_recipe_reference_matches_the_schema():
    assert reference_markdown() in REFERENCE.read_text(encoding="utf-8"), (
        "docs/reference.md's recipe reference is stale: paste the output of `gptpipe config --reference` over it"
    )
