"""Shared state directories: two instances never get the same RocksDB, a freed slot is reused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from viewevents.state.slots import claim_slot

HOLD = """
import sys, time
from viewevents.state.slots import claim_slot
slot = claim_slot(sys.argv[1])
print(slot.path.name, flush=True)
sys.stdin.read()  # hold the slot until the test closes stdin
"""


def test_each_claim_gets_its_own_slot_and_a_released_one_is_taken_again(tmp_path: Path) -> None:
    first, second = claim_slot(tmp_path), claim_slot(tmp_path)
    assert (first.path.name, second.path.name) == ("slot-0", "slot-1")
    assert first.path.is_dir() and second.path.is_dir()
    first.release()
    again = claim_slot(tmp_path)
    assert again.path.name == "slot-0"  # the lowest free one: a recreated replica's old store
    again.release()
    second.release()


def test_a_slot_held_by_another_process_is_skipped_and_freed_when_it_exits(
    tmp_path: Path,
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "slot-0"
        mine = claim_slot(tmp_path)
        assert mine.path.name == "slot-1"
        mine.release()
    finally:
        holder.communicate("", timeout=30)  # exits: the kernel drops its lock
    after = claim_slot(tmp_path)
    assert after.path.name == "slot-0"
    after.release()
