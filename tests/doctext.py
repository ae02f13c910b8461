"""Reading the documentation as a renderer would: fenced blocks, headings and their anchors, links.

Typical use::

    for block in fences(DOCS_DIR / "embedding.md"):      # FenceError if a fence is left open
        if block.info == "python": ...
    code = marked_block(DOCS_DIR / "toxics.md", "test_greeter.py").text
    anchors(DOCS_DIR / "api.md")                          # {"http-api-toxiproxy-compatible", ...}

Tests that check what the docs say read them through this module, so a fence out of step (one
missing, or one extra) is an error where it happens, not a silent swap of prose and code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
DOCS_DIR = ROOT / "docs"


def documents() -> List[Path]:
    """Every Markdown file a reader is sent to: the README, the changelog and docs/*.md."""
    return [ROOT / "README.md", *sorted(p for p in (ROOT / "CHANGELOG.md",) if p.exists()),
            *sorted(DOCS_DIR.glob("*.md"))]


class FenceError(AssertionError):
    """A fence that does not open or close where the author meant it to."""


@dataclass(frozen=True)
class Block:
    info: str           #: the opening fence's info string (the language)
    start: int          #: line number (1-based) of the opening fence
    text: str           #: the lines between the fences, each ending in a newline
    marker: str         #: the ``<!-- example-file: NAME -->`` line just before it, else ""


# CommonMark: a fence is 3+ backticks or tildes indented by at most 3 spaces; it closes on a
# line of the same character, at least as long, with nothing after it.
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_MARKER = re.compile(r"^<!-- example-file: (\S+) -->$")


def _scan(path: Path) -> Tuple[List[Block], List[Tuple[int, str]]]:
    """The fenced blocks and the lines outside them (numbered), or FenceError."""
    blocks: List[Block] = []
    outside: List[Tuple[int, str]] = []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    opening = None          # (fence, info, start line, marker, body lines) while inside a block
    for number, line in enumerate(lines, 1):
        match = _FENCE.match(line.rstrip("\n"))
        if opening is None:
            if match is None:
                outside.append((number, line))
                continue
            fence, info = match.group(1), match.group(2).strip()
            # Every block here names its language: so a block that opens where a closing fence
            # was meant (the sign of a fence missing above) is caught at that very line.
            if not info:
                raise FenceError(f"{path.name}:{number}: a fence opens with no language; "
                                 "is a closing fence missing above it?")
            if fence[0] == "`" and "`" in info:
                outside.append((number, line))   # not a fence: inline code at a line's start
                continue
            before = outside[-1][1].strip() if outside and outside[-1][0] == number - 1 else ""
            marker = _MARKER.match(before)
            opening = (fence, info, number, marker.group(1) if marker else "", [])
        elif match and match.group(1)[0] == opening[0][0] and len(match.group(1)) >= len(opening[0]) \
                and not match.group(2).strip():
            fence, info, start, marker, body = opening
            blocks.append(Block(info, start, "".join(body), marker))
            opening = None
        else:
            opening[4].append(line)
    if opening is not None:
        raise FenceError(f"{path.name}:{opening[2]}: a fence opened here is never closed")
    return blocks, outside


def fences(path: Path) -> List[Block]:
    """Every fenced block of a Markdown file, in order; FenceError if the fences are unbalanced."""
    return _scan(path)[0]


def marked_block(path: Path, name: str) -> Block:
    """The one block preceded by ``<!-- example-file: NAME -->``."""
    found = [b for b in fences(path) if b.marker == name]
    assert len(found) == 1, f"{path.name}: {len(found)} blocks marked example-file: {name}"
    return found[0]


_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation dropped,
    spaces to hyphens."""
    text = _LINK.sub(lambda m: m.group(0)[1:m.group(0).index("](")], heading)
    text = text.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set:
    """Every heading's anchor in a Markdown file (repeated headings get -1, -2... as on GitHub)."""
    seen: Dict[str, int] = {}
    result = set()
    for _, line in _scan(path)[1]:
        match = re.match(r"^#{1,6} +(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def links(path: Path) -> List[Tuple[int, str]]:
    """Every link target of the prose (not of code), with its line number."""
    found = []
    for number, line in _scan(path)[1]:
        for match in _LINK.finditer(_INLINE_CODE.sub("", line)):
            found.append((number, match.group(1)))
    return found


def section(path: Path, heading: str) -> str:
    """The prose and code under a heading, up to the next heading of the same or a higher level."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    inside_fence = {n for b in fences(path) for n in range(b.start, b.start + b.text.count("\n") + 2)}
    start = level = None
    for number, line in enumerate(lines, 1):
        if number in inside_fence:
            continue
        match = re.match(r"^(#{1,6}) +(.*?)\s*$", line)
        if not match:
            continue
        if start is None and match.group(2) == heading:
            start, level = number, len(match.group(1))
        elif start is not None and len(match.group(1)) <= level:
            return "".join(lines[start:number - 1])
    assert start is not None, f"{path.name}: no heading {heading!r}"
    return "".join(lines[start:])
