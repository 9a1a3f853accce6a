"""docs/METHOD.md, the method document that code, tests, scripts and the README cite as ``docs/METHOD.md §N``.

A citation of a section that does not exist, or of ``METHOD.md`` anywhere but under ``docs/``, is a dead
reference for whoever reads the clone: the scan over every .py, .sh and .md file of the repository fails
on it. The README must link the document.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "METHOD.md"
SUFFIXES = {".py", ".sh", ".md"}
# Folders that are not the project's text: environments, build output, experiment runs, datasets.
SKIPPED_TOP = {"build", "dist", "runs", "data"}

HEADING = re.compile(r"^## (\d+)\. \S", re.MULTILINE)
# "METHOD.md", optionally with its folder, then the sections it names: "§3", "§3-§4", "§2 and §9", "§1, §5".
CITATION = re.compile(r"(\S*)METHOD\.md((?:\s*§\s*\d+(?:\s*(?:[-–]|,|and)\s*§\s*\d+)*)?)")
SECTION = re.compile(r"§\s*(\d+)")
RANGE = re.compile(r"§\s*(\d+)\s*[-–]\s*§\s*(\d+)")


def sections_of(text: str) -> list[int]:
    """The numbers of the document's ``## N. Title`` headings, in order."""
    return [int(n) for n in HEADING.findall(text)]


def cited_sections(tail: str) -> set[int]:
    """The sections a citation's tail names; a range ``§3-§5`` names 3, 4 and 5."""
    cited = {int(n) for n in SECTION.findall(tail)}
    for first, last in RANGE.findall(tail):
        cited.update(range(int(first), int(last) + 1))
    return cited


def citation_problems(text: str, sections: set[int], where: str) -> list[str]:
    """Every dead reference in ``text``: a ``METHOD.md`` not under ``docs/`` (a page in docs/ itself may say
    ``METHOD.md``), or a section not in ``sections``."""
    problems = []
    beside = where.startswith("docs/")
    for match in CITATION.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        folder = re.split(r"[\[\]()`'\"]", match.group(1))[-1]  # the path, without link or quote marks
        if not folder.endswith("docs/") and not (beside and folder == ""):
            problems.append(f"{where}:{line}: '{match.group(0).strip()}' does not point at docs/METHOD.md")
        for number in sorted(cited_sections(match.group(2)) - sections):
            problems.append(f"{where}:{line}: docs/METHOD.md has no §{number}")
    return problems


def repository_files() -> list[Path]:
    """The .py, .sh and .md files of the checkout, without hidden folders, environments and build output."""
    files = []
    for path in REPO.rglob("*"):
        parts = path.relative_to(REPO).parts
        if path.suffix not in SUFFIXES or not path.is_file() or path == Path(__file__).resolve():
            continue  # (this file's examples of dead references are deliberate)
        if parts[0] in SKIPPED_TOP or any(p.startswith(".") or p.endswith(".egg-info") for p in parts):
            continue
        files.append(path)
    return files


def test_the_document_numbers_its_sections_from_1() -> None:
    numbers = sections_of(DOC.read_text(encoding="utf-8"))
    assert numbers[:9] == list(range(1, 10))  # the numbers the code cites
    assert numbers == list(range(1, len(numbers) + 1))


def test_every_cited_section_exists() -> None:
    sections = set(sections_of(DOC.read_text(encoding="utf-8")))
    problems, citations = [], 0
    for path in repository_files():
        text = path.read_text(encoding="utf-8")
        citations += len(CITATION.findall(text))
        problems += citation_problems(text, sections, str(path.relative_to(REPO)))
    assert citations > 40, "the scan found too few citations to be looking at the repository"
    assert problems == []


def test_the_document_cites_only_its_own_sections() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert {int(n) for n in SECTION.findall(text)} <= set(sections_of(text))


def test_the_readme_links_the_document() -> None:
    assert "](docs/METHOD.md)" in (REPO / "README.md").read_text(encoding="utf-8")


def test_the_scan_catches_dead_references() -> None:
    sections = {1, 2, 3, 4, 5}
    text = (
        "see docs/METHOD.md §3-§5, docs/METHOD.md §2 and §4;\n"
        "METHOD.md §2 is not under docs/; docs/METHOD.md §3-§7 runs past the end; (docs/METHOD.md §42)"
    )
    assert citation_problems(text, sections, "x") == [
        "x:2: 'METHOD.md §2' does not point at docs/METHOD.md",
        "x:2: docs/METHOD.md has no §6",
        "x:2: docs/METHOD.md has no §7",
        "x:2: docs/METHOD.md has no §42",
    ]
    assert cited_sections(" §2 and §9") == {2, 9}
    assert cited_sections(" §3–§5") == {3, 4, 5}
    assert sections_of("## 1. One\n## 2. Two\n### 2.1 not a section\n") == [1, 2]
