"""The docs stand alone for a user: they cite no path outside the project, no internal issue number, and every
file they point at exists (README.md and docs/, results pages and their scripts included)."""

import re

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "docs").rglob("*.sh"))]


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(REPO)))
def test_a_doc_cites_nothing_outside_the_project_and_no_issue_number(path):
    text = path.read_text()
    assert "../shared" not in text and "/work/" not in text
    assert not re.search(r"\bissues? ?#?\d+|\bissue-\d+", text, re.IGNORECASE), \
        re.search(r".{0,40}\bissues? ?#?\d+.{0,40}|.{0,40}\bissue-\d+.{0,40}", text, re.IGNORECASE).group(0)


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_file_a_doc_names_exists(path):
    text = path.read_text()
    named = set(re.findall(r"\]\(([^)#\s]+)", text))  # markdown links
    named |= set(re.findall(r"\b([A-Z][A-Z_]+\.md)\b", text))  # DESIGN.md, README.md, ...
    named |= set(re.findall(r"`((?:scripts|tokenrig|benchmarks)/[\w./-]+\.\w+)`", text))
    missing = [name for name in named if not name.startswith("http")
               and not any((base / name).exists() for base in (path.parent, REPO))]
    assert not missing, missing
