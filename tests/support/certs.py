"""Throw-away certificates made with openssl at test time (never committed)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path


def make_ca_and_cert(
    folder: Path, name: str, names: Sequence[str] = ("IP:127.0.0.1", "DNS:localhost")
) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate signed by it, valid for `names` (subjectAltName
    entries); returns (ca.pem, server.pem, server.key)."""
    ca_key, ca_cert = folder / f"{name}-ca.key", folder / f"{name}-ca.pem"
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    ext = folder / f"{name}.ext"
    ext.write_text(f"subjectAltName={','.join(names)}\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN={name} test CA", "-keyout", str(ca_key), "-out", str(ca_cert),
    )  # fmt: skip
    run(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", str(key), "-out", str(csr),
    )  # fmt: skip
    run(
        "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert),
    )  # fmt: skip
    return ca_cert, cert, key
