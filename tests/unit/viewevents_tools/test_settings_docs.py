"""Documentation that must not drift from the code."""

from __future__ import annotations

from tests.support import REPO
from viewevents_tools.settings_catalogue import markdown_table


def test_operations_page_lists_every_setting_with_its_default() -> None:
    page = (REPO / "docs" / "operations.md").read_text()
    block = page.split("<!-- settings:begin (python -m viewevents_tools.settings_catalogue) -->\n")[
        1
    ].split("\n<!-- settings:end -->")[0]
    assert block == markdown_table(), (
        "regenerate with: python -m viewevents_tools.settings_catalogue"
    )
