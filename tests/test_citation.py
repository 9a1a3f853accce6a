"""The licence and the citation: LICENSE, CITATION.cff and the README's BibTeX name the same licence, papers
and authors (in the same order), so that whichever a reader copies is right."""

from __future__ import annotations

import re

from helpers import REPO

PAPERS = {
    "Filter Grafting for Deep Neural Networks": ["Meng", "Cheng", "Li", "Xu", "Ji", "Sun", "Lu"],
    "Filter Grafting for Deep Neural Networks: Reason, Method, and Cultivation": [
        *("Cheng", "Meng", "Li", "Gao", "Lu", "Sun", "Ji"),
    ],
}


def _cff_papers() -> dict[str, list[str]]:
    """Title -> author family names of every paper CITATION.cff names (preferred-citation and references)."""
    text = (REPO / "CITATION.cff").read_text()
    papers, title = {}, None
    for line in text.splitlines():
        if match := re.match(r"\s+title: \"(.*)\"", line):  # indented: a paper, not the software
            title = match.group(1)
            papers[title] = []
        elif (match := re.match(r"\s+- family-names: (.*)", line)) and title is not None:
            papers[title].append(match.group(1).strip())
    return papers


def _bibtex_papers() -> dict[str, list[str]]:
    """Title -> author family names of every BibTeX entry in the README."""
    text = (REPO / "README.md").read_text()
    [block] = re.findall(r"```bibtex\n(.*?)```", text, re.S)
    papers = {}
    for entry in re.split(r"\n(?=@)", block.strip()):
        title = re.search(r"title\s*=\s*\{(.*)\}", entry).group(1)
        authors = re.search(r"author\s*=\s*\{(.*)\}", entry).group(1).split(" and ")
        papers[title] = [author.split(",")[0].strip() for author in authors]
    return papers


def test_citation_file_and_readme_name_both_papers_with_their_authors() -> None:
    assert _bibtex_papers() == PAPERS
    assert {t: a for t, a in _cff_papers().items() if t in PAPERS} == PAPERS
    cff = (REPO / "CITATION.cff").read_text()
    assert "cff-version: 1.2.0" in cff and "start: 6599" in cff and "arXiv:2004.12311" in cff


def test_one_licence_everywhere() -> None:
    assert (REPO / "LICENSE").read_text().startswith("MIT License\n")
    assert "license: MIT" in (REPO / "CITATION.cff").read_text()
    assert 'license="MIT"' in (REPO / "setup.py").read_text()
    assert "[MIT licence](LICENSE)" in (REPO / "README.md").read_text()
