"""The repository stands alone (docs/conventions.md, "Comments say why, and cite"): no file
points at design notes or data that live outside it, every relative link of the docs leads to a
file that exists, and every `docs/NAME.md, "Section"` citation names a real heading."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from procs import REPO

SKIP_DIRS = {".git", ".venv", "venv", ".hypothesis", ".mypy_cache", ".ruff_cache",
             ".pytest_cache", "__pycache__", "runs", "build", "dist", "node_modules"}
TEXT_SUFFIXES = {".py", ".pyi", ".md", ".toml", ".yml", ".yaml", ".proto", ".sh", ".txt",
                 ".cfg", ".ini", ".json", ""}
# Files outside the repository that code and docs once cited.
OUTSIDE = re.compile("|".join([
    r"\b(?:DESIGN|ALGORITHMS|STYLE)\.md\b",      # the team's design notes
    r"\.\./shared\b",                              # a sibling directory of the clone
    r"(?<![\w.-])shared/(?:data|hooks|[A-Z])",     # its data sets and notes
    r'/ "shared" /',                               # the same, as a pathlib join
]))
CITATION = re.compile(r'docs/([\w-]+\.md),\s+"([^"]+)"')
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def text_files() -> Iterator[Path]:
    for path in sorted(REPO.rglob("*")):
        relative = path.relative_to(REPO)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in relative.parts):
            continue
        if path == Path(__file__).resolve():  # its examples of what it forbids
            continue
        if path.is_file() and path.suffix in TEXT_SUFFIXES and path.stat().st_size < 2_000_000:
            yield path


def read(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        return ""


FILES = list(text_files())


def test_nothing_points_outside_the_repository() -> None:
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
             for path in FILES for n, line in enumerate(read(path).splitlines(), 1)
             if OUTSIDE.search(line)]
    assert not found, ("references to files outside the repository; point them at docs/ "
                       "instead:\n" + "\n".join(found))


@pytest.mark.parametrize("line", [
    "see DESIGN.md section 7", "(ALGORITHMS.md, 3)", "STYLE.md habit 4",
    "--data-dir ../shared/data/mnist", "from shared/data/mnist", 'REPO.parent / "shared" / "data"',
])
def test_the_outside_pattern_catches_the_old_forms(line: str) -> None:
    assert OUTSIDE.search(line)


def headings(doc: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in read(doc).splitlines() if line.startswith("#")]


def test_every_section_citation_names_a_heading_of_that_doc() -> None:
    broken = []
    for path in FILES:
        text = re.sub(r"\s*\n\s*(?:#\s*)?", " ", read(path))  # citations wrap across lines
        for name, section in CITATION.findall(text):
            doc = REPO / "docs" / name
            if not doc.exists():
                broken.append(f"{path.relative_to(REPO)}: docs/{name} does not exist")
            elif not any(section.lower() in h.lower() for h in headings(doc)):
                broken.append(f"{path.relative_to(REPO)}: docs/{name} has no heading "
                              f"{section!r}")
    assert not broken, "\n".join(broken)


def test_relative_links_of_the_docs_lead_to_files() -> None:
    broken = []
    for path in FILES:
        if path.suffix != ".md":
            continue
        for target in LINK.findall(read(path)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(REPO)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)
