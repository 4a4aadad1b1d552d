"""Server credentials: mutual TLS, client certificate required and verified against the CA."""

from __future__ import annotations

from pathlib import Path

import grpc


class CredentialsError(ValueError):
    """A certificate or key file is missing or unreadable."""


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CredentialsError(f"{what} {path}: {e.strerror}") from None
    if b"-----BEGIN" not in data:
        raise CredentialsError(f"{what} {path}: not a PEM file")
    return data


def server_credentials(ca_cert: Path, server_cert: Path, server_key: Path) -> grpc.ServerCredentials:
    """mTLS credentials; grpc's core enforces TLS 1.2 as the minimum and the cipher policy set in __init__."""
    return grpc.ssl_server_credentials(
        [(_read(server_key, "server key"), _read(server_cert, "server certificate"))],
        root_certificates=_read(ca_cert, "CA certificate"),
        require_client_auth=True,
    )
