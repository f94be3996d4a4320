"""docs/architecture.md's code layout names every module, so the map stays true."""

from __future__ import annotations

import re

from tests.support import REPO

PACKAGES = (
    "viewevents",
    "ingest_service",
    "stats_service",
    "recommender_service",
    "viewevents_client",
    "viewevents_tools",
    "benchmarks",
    "evaluation",
    "drills",
)


def test_every_module_is_in_the_layout_tree() -> None:
    page = (REPO / "docs" / "architecture.md").read_text()
    tree = page.split("<!-- layout:begin -->")[1].split("<!-- layout:end -->")[0]
    named = set(re.findall(r"[\w/]+\.py", tree))
    missing = []
    for package in PACKAGES:
        root = REPO / package
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.py")):
            relative = path.relative_to(root)
            if path.name == "__init__.py" or relative.parts[0] == "v1":
                continue
            inside = relative.as_posix()
            if inside not in named and path.name not in named:
                missing.append(f"{package}/{inside}")
    assert not missing, f"add to docs/architecture.md's layout tree: {missing}"
