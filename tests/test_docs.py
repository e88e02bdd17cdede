"""The documentation's relative links resolve: README.md, bench/README.md and every docs/*.md page.

A link ``[text](target)`` whose target is not a web or mail address must name a file that exists relative to the
linking file, and a ``#anchor`` must be the GitHub slug of one of the target's headings. Code (fenced blocks and
inline spans) is left out: a link-shaped string there is not a link.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 260

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
EXTERNAL = ("http://", "https://", "mailto:")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (link targets and code marks dropped), lowercased, punctuation other
    than hyphens, underscores and spaces removed, each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in ``path``; a repeated heading gets GitHub's -1, -2, ... suffixes."""
    seen: Counter[str] = Counter()
    found = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        found.add(f"{base}-{seen[base]}" if seen[base] else base)
        seen[base] += 1
    return found


def links(path: Path) -> list[str]:
    """The relative link targets in ``path``'s prose."""
    targets = LINK.findall(prose(path.read_text(encoding="utf-8")))
    return [t for t in targets if not t.startswith(EXTERNAL)]


def broken_links(path: Path) -> list[str]:
    """Each relative link of ``path`` that names a missing file or a heading its target does not have."""
    broken = []
    for target in links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file {linked}")
        elif anchor and linked.is_file() and anchor not in anchors(linked):
            broken.append(f"{target}: {linked.name} has no heading with the anchor #{anchor}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert page.exists()
    assert broken_links(page) == []


def test_the_readme_is_short_and_links_every_docs_page() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it to {README_MAX_LINES}"
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    docs_pages = sorted((ROOT / "docs").glob("*.md"))
    assert docs_pages
    assert [p.name for p in docs_pages if p.resolve() not in linked] == []


def test_a_missing_file_or_heading_is_caught(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A Heading: with `code`, punctuation!\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md#a-heading-with-code-punctuation) [second](there.md#twice-1) [web](https://example.com/x.md)\n"
        "[gone](missing.md) [bad anchor](there.md#no-such-heading) [self](#nowhere)\n"
        "`[in code](missing-too.md)`\n\n```\n[in a block](missing-three.md)\n```\n"
    )
    assert broken_links(page) == [
        f"missing.md: no such file {tmp_path / 'missing.md'}",
        "there.md#no-such-heading: there.md has no heading with the anchor #no-such-heading",
        "#nowhere: page.md has no heading with the anchor #nowhere",
    ]
