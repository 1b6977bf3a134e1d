"""The README stays a newcomer's first page; the docs/ pages hold the rest. Keep them in step.

The recipe reference in docs/reference.md is generated from the schema; the README links every
docs page, and every relative link in README.md and docs/ leads to a file (and heading) that exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flows.cli.recipe_reference import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference.md"
README_MAX_LINES = 260

# [text](target) and ![alt](target); a target ends at whitespace or ')' (none of ours hold either).
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE_SPAN = re.compile(r"`[^`\n]*`")


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _links(page: Path) -> list[str]:
    text = _CODE_SPAN.sub("", _FENCE.sub("", page.read_text(encoding="utf-8")))
    return _LINK.findall(text)


def _relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)  # http:, https:, mailto: …


def _anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower().replace("`", "")).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_recipe_reference_matches_the_schema():
    assert reference_markdown() in REFERENCE.read_text(encoding="utf-8"), (
        "docs/reference.md's recipe reference is stale: paste the output of `gptpipe config --reference` over it"
    )


def test_readme_stays_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail into a docs/ page and link it"
    )


def test_readme_links_every_docs_page():
    linked = {(README.parent / target.split("#")[0]).resolve() for target in _links(README) if _relative(target)}
    unlinked = [str(p.relative_to(ROOT)) for p in sorted(DOCS.rglob("*")) if p.is_file() and p.resolve() not in linked]
    assert not unlinked, f"docs pages not linked from README.md: {unlinked}"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in _links(page):
        if not _relative(target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no heading '#{anchor}' in {file.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"
