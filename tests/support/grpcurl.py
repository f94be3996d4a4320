"""The real grpcurl (built by `make tools`): only integration and e2e tests use it."""

from __future__ import annotations

import shutil
import subprocess

from tests.support.configs import REPO

GRPCURL = shutil.which("grpcurl") or str(REPO / ".cache" / "go" / "bin" / "grpcurl")


def grpcurl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`grpcurl -plaintext <args>`, output captured as text."""
    return subprocess.run(
        [GRPCURL, "-plaintext", *args], input=stdin, capture_output=True, text=True, timeout=60
    )
