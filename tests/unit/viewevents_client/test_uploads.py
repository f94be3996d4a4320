"""The upload client's bookkeeping without a server (moved from the CLI upload test)."""

from __future__ import annotations

from viewevents_client.uploads import LineIndex


def test_line_index_maps_stream_positions_back_to_lines() -> None:
    index = LineIndex()
    lines = [("a", 1), ("a", 2), ("a", 5), ("a", 6), ("a", 7), ("b", 1), ("b", 3)]
    for path, line in lines:
        index.add(path, line)
    assert [index.locate(i) for i in range(len(lines))] == lines
    assert len(index._runs) == 4  # memory grows with interruptions, not with events
