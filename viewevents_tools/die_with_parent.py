"""`python -m viewevents_tools.die_with_parent PARENT_PID MODULE [ARGS...]`: run MODULE as
`python -m MODULE ARGS...` would, in a process the kernel stops (SIGTERM) when its parent dies,
whatever kills the parent (PR_SET_PDEATHSIG). Tools start services through it.

Why a launcher and not Popen's `preexec_fn`: that runs between fork and exec in a copy of a
parent that has threads (gRPC's, after a health check), where a lock another thread held at the
fork stays locked forever; the child then never reaches exec, and Popen, waiting for the exec,
never returns (a demo run in CI hung so: the recommender's log stayed empty). Here the signal
is asked for after exec, in a fresh single-threaded interpreter.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        sys.exit("usage: python -m viewevents_tools.die_with_parent PARENT_PID MODULE [ARGS...]")
    parent, module = int(argv[1]), argv[2]
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the signal was asked for
        os._exit(1)
    sys.argv = [module, *argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv)
