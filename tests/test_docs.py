"""The README is a user's guide within its size budget, its Quick start is the two commands CI runs, and every local
link in the README and docs/ points at a file that exists."""
from __future__ import annotations

import re

from conftest import REPO

README_BUDGET = 30_720   # bytes: details go to docs/


def test_readme_stays_within_its_budget():
    size = (REPO / "README.md").stat().st_size
    assert size <= README_BUDGET, f"README.md is {size} bytes (budget {README_BUDGET}): move details to docs/"


def test_quick_start_is_the_ci_command():
    text = (REPO / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick.strip().splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "exec bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_local_links_resolve():
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken
