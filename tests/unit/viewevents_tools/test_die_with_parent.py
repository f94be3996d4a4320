"""Services started by the tools die with their parent, through a launcher that asks for that
after exec (a `preexec_fn` could deadlock a parent with threads between fork and exec)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap

import psutil

from tests.support import wait_for
from tests.support.configs import REPO


def test_the_launcher_runs_a_module_as_python_dash_m_would() -> None:
    direct = subprocess.run(
        [sys.executable, "-m", "platform", "--terse"], capture_output=True, text=True, check=True
    )
    launched = subprocess.run(
        [sys.executable, "-m", "viewevents_tools.die_with_parent", str(os.getpid()), "platform"]
        + ["--terse"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert launched.stdout == direct.stdout and launched.stdout.strip()


def test_a_launched_child_of_a_dead_parent_exits_at_once() -> None:
    """The parent's pid no longer being its parent's: it exits before running anything."""
    launched = subprocess.run(
        [sys.executable, "-m", "viewevents_tools.die_with_parent", "1", "platform"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert launched.returncode == 1 and not launched.stdout


def test_a_spawned_service_dies_when_its_parent_is_killed_with_sigkill() -> None:
    parent_script = textwrap.dedent(
        """
        import threading, time
        from viewevents_tools.processes import spawn_service

        def busy():  # threads running in the parent while it forks, as gRPC's do in the tools
            while True:
                time.sleep(0)

        for _ in range(4):
            threading.Thread(target=busy, daemon=True).start()
        child = spawn_service("tests.support.idle_child", None, None)
        print(child.pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    child: psutil.Process | None = None
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        # The child's own line (it shares the parent's stdout): past its start-up checks.
        assert parent.stdout.readline().strip() == "idle child running"
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        running = child
        wait_for(lambda: not running.is_running() or running.status() == psutil.STATUS_ZOMBIE, 30)
    finally:
        parent.kill()
        if child is not None:
            with contextlib.suppress(psutil.Error):
                child.kill()  # only when the test failed: never leave it behind
