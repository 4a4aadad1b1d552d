"""Server credentials and what the server trusts: mutual TLS, CA, CRL, deny list; reloadable on SIGHUP."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("jobsvc.server")


class CredentialsError(ValueError):
    """A certificate, key, CRL or deny file is missing or unreadable."""


def _read(path: Path, what: str, pem: bool = True) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CredentialsError(f"{what} {path}: {e.strerror}") from None
    if pem and b"-----BEGIN" not in data:
        raise CredentialsError(f"{what} {path}: not a PEM file")
    return data


@dataclass(frozen=True)
class TrustFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    crl: Path | None = None
    deny_file: Path | None = None
    deny_subjects: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _Loaded:
    config: grpc.ServerCertificateConfiguration
    revoked: frozenset[tuple[str, int]]  # (issuer RFC 4514, serial)
    denied: frozenset[str]


class TrustPolicy:
    """The server's certificate, the CA it trusts for clients, revoked certificates and denied Subjects.

    The TLS handshake uses grpc's dynamic credentials, so a reload reaches every new connection while established
    ones (and their open streams) go on. grpcio has no API for CRLs in the handshake: revoked certificates are
    refused by the identity check, before any handler runs (UNAUTHENTICATED).
    """

    def __init__(self, files: TrustFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._current = self._load()
        self._fresh: grpc.ServerCertificateConfiguration | None = None

    def _load(self) -> _Loaded:
        f = self.files
        ca = _read(f.ca_cert, "CA certificate")
        config = grpc.ssl_server_certificate_configuration(
            [(_read(f.server_key, "server key"), _read(f.server_cert, "server certificate"))], root_certificates=ca
        )
        revoked: frozenset[tuple[str, int]] = frozenset()
        if f.crl is not None:
            revoked = _load_crl(_read(f.crl, "CRL", pem=False), ca, f.crl)
        denied = set(f.deny_subjects)
        if f.deny_file is not None:
            for line in _read(f.deny_file, "deny file", pem=False).decode(errors="replace").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    denied.add(_normalise_subject(line))
        return _Loaded(config, revoked, frozenset(_normalise_subject(s) for s in denied))

    def reload(self) -> None:
        """Read every file again; on any error keep what is in force and raise CredentialsError."""
        loaded = self._load()
        with self._lock:
            self._current = loaded
            self._fresh = loaded.config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._current.config,
            self._fetch,  # type: ignore[arg-type]  # grpc's stub omits the documented None ("no change")
            require_client_authentication=True,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # grpc calls this before every new handshake: None keeps the configuration in force
        with self._lock:
            fresh, self._fresh = self._fresh, None
        return fresh

    def is_revoked(self, issuer: str, serial: int) -> bool:
        return (issuer, serial) in self._current.revoked

    def is_denied(self, subject: str) -> bool:
        return subject in self._current.denied


def _normalise_subject(subject: str) -> str:
    """A Subject as jobsvc writes identities (RFC 4514 via cryptography), so 'CN=a, O=b' matches 'CN=a,O=b'."""
    from cryptography import x509

    try:
        return x509.Name.from_rfc4514_string(subject).rfc4514_string()
    except ValueError:
        return subject.strip()


def _load_crl(data: bytes, ca_pem: bytes, path: Path) -> frozenset[tuple[str, int]]:
    from cryptography import x509

    try:
        crl = x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
    except ValueError as e:
        raise CredentialsError(f"CRL {path}: {e}") from None
    issuers = [c for c in x509.load_pem_x509_certificates(ca_pem) if c.subject == crl.issuer]
    if not any(crl.is_signature_valid(c.public_key()) for c in issuers):  # type: ignore[arg-type]
        raise CredentialsError(f"CRL {path}: not signed by the CA")
    return frozenset((crl.issuer.rfc4514_string(), r.serial_number) for r in crl)
