"""Public text (help, docstrings, README, docs, studies, recipes) names papers by title and arXiv
id and speaks of the project only: not of the files, specifications, issues or sessions it was
made from."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
INTERNAL = re.compile(
    r"[Ss]eeds? 00\d|\bSPEC\b|[Ii]ssues? #?\d+|seed files?\b|"
    r"\b(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth) (?:session|round)"
)


def _public_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
    files += sorted((ROOT / "docs").glob("*.md"))
    files += sorted((ROOT / "src" / "moecl").rglob("*.py"))
    files += sorted((ROOT / "studies").glob("*.yaml")) + sorted((ROOT / "configs").rglob("*.yaml"))
    files += sorted((ROOT / "examples").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    return files


def test_public_text_speaks_of_the_project_only():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}"
        for path in _public_files()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if INTERNAL.search(line)
    ]
    assert not found, "\n".join(found)
