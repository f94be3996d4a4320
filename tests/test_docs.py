"""Documentation that must not drift from the code."""

from __future__ import annotations

from pathlib import Path

from viewevents.config import SETTINGS

REPO = Path(__file__).resolve().parent.parent


def test_operations_page_lists_every_setting_with_its_default() -> None:
    page = (REPO / "docs" / "operations.md").read_text()
    for setting in SETTINGS:
        default = setting.default if setting.default != "" else "(empty)"
        assert f"| `{setting.env}` | `{setting.flag}` | `{default}` |" in page, setting.env
