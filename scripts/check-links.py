#!/usr/bin/env python3
"""Fails on a broken relative link or anchor in the documentation: README.md, docs/*.md and
infra/README.md. The handbook is split over several pages that link to each other's sections, so a
renamed heading or a moved section would otherwise leave links that go nowhere, silently.

A link is `[text](target)` outside code; `target` is a path relative to the page, optionally with
`#anchor`, or `#anchor` alone for the same page. A path must exist; an anchor must be a heading's
slug (as GitHub makes it: lowercase, punctuation dropped, spaces to hyphens, `-1`, `-2`, ... for
repeats) or an explicit `<a id="...">` in the target page. Links to other schemes (https:, ...)
are not checked: this runs offline. Standard library only."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "docs/*.md", "infra/README.md"]

FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[ \t]*$", re.S | re.M)  # fences in lists too
INLINE_CODE = re.compile(r"`[^`]+`")
LINK = re.compile(r"\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(([^()\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
EXPLICIT = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def blank(match: re.Match) -> str:
    """Code is not prose: its brackets are no links. Blanked, not removed, so line numbers hold."""
    return re.sub(r"[^\n]", " ", match.group(0))


def prose(text: str) -> str:
    return INLINE_CODE.sub(blank, FENCE.sub(blank, text))


def slug(heading: str) -> str:
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    heading = re.sub(r"<[^>]+>", "", heading)
    heading = heading.strip().lower()
    heading = re.sub(r"[^\w\- ]", "", heading)
    return heading.replace(" ", "-")


def anchors(path: Path, cache: dict) -> set:
    if path not in cache:
        text = path.read_text()
        found, seen = set(EXPLICIT.findall(text)), {}
        # Headings inside code fences are not headings.
        for heading in HEADING.findall(FENCE.sub(blank, text)):
            base = slug(heading)
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        cache[path] = found
    return cache[path]


def problems() -> list:
    found, cache = [], {}
    pages = sorted({p for pattern in PAGES for p in ROOT.glob(pattern)})
    for page in pages:
        text = prose(page.read_text())
        for m in LINK.finditer(text):
            target = m.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue
            line = text.count("\n", 0, m.start()) + 1
            where = f"{page.relative_to(ROOT)}:{line}"
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.exists():
                found.append(f"{where}: {target}: no such file")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest, cache):
                found.append(f"{where}: {target}: no such section in {dest.relative_to(ROOT)}")
    return found


if __name__ == "__main__":
    broken = problems()
    for problem in broken:
        print(problem, file=sys.stderr)
    if broken:
        print(f"check-links: {len(broken)} broken link(s)", file=sys.stderr)
        sys.exit(1)
    print("check-links: every relative link and anchor resolves")
