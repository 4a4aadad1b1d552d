"""A development PKI with `cryptography`: a CA, a server certificate and one client certificate per user."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = []
    if organization is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def make_ca(subject: x509.Name | str = "jobsvc dev CA", days: int = 3650) -> Issued:
    """A self-signed ECDSA P-256 CA."""
    subj = name(subject) if isinstance(subject, str) else subject
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subj)
        .issuer_name(subj)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY)
        .not_valid_after(now + days * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(
    ca: Issued,
    subject: x509.Name | str,
    *,
    server: bool = False,
    client: bool = True,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """A leaf certificate signed by ca, with serverAuth and/or clientAuth extended key usage."""
    subj = name(subject) if isinstance(subject, str) else subject
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subj)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - DAY)
        .not_valid_after(not_after or now + 825 * DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class PkiExistsError(FileExistsError):
    pass


def _check_users(directory: Path, users: list[str], names: list[str]) -> None:
    """Refuse bad user names, a name twice, and any file that exists already (nothing is ever overwritten)."""
    for user in users:
        if not user or "/" in user or user.startswith(".") or user in ("ca", "server", "crl") or not user.isprintable():
            raise ValueError(f"bad user name {user!r}")
        if users.count(user) > 1:
            raise ValueError(f"user {user!r} given twice")
    names = names + [n for user in users for n in (f"{user}.pem", f"{user}-key.pem")]
    existing = [n for n in names if (directory / n).exists()]
    if existing:
        raise PkiExistsError(f"refusing to overwrite {', '.join(str(directory / n) for n in existing)}")


def init(directory: Path, users: list[str]) -> list[Path]:
    """Write ca, server and per-user certificates and keys (keys mode 0600); never overwrite an existing file."""
    _check_users(directory, users, ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem"])
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = make_ca()
    server = issue(ca, "localhost", server=True, client=False, dns=("localhost",), ips=("127.0.0.1", "::1"))
    written = []
    for stem, issued in [("ca", ca), ("server", server)] + [(u, issue(ca, u)) for u in users]:
        _write(directory / f"{stem}.pem", issued.cert_pem, 0o644)
        _write(directory / f"{stem}-key.pem", issued.key_pem, 0o600)
        written += [directory / f"{stem}.pem", directory / f"{stem}-key.pem"]
    return written


def add_users(directory: Path, users: list[str]) -> list[Path]:
    """Client certificates for more users, signed by DIR's existing CA; never overwrite an existing file."""
    for stem in ("ca.pem", "ca-key.pem"):
        if not (directory / stem).is_file():
            raise FileNotFoundError(f"{directory / stem}: no such file (make the PKI with `jobsvc pki init` first)")
    _check_users(directory, users, [])
    ca = load(directory, "ca")
    written = []
    for user in users:
        issued = issue(ca, user)
        _write(directory / f"{user}.pem", issued.cert_pem, 0o644)
        _write(directory / f"{user}-key.pem", issued.key_pem, 0o600)
        written += [directory / f"{user}.pem", directory / f"{user}-key.pem"]
    return written


def load(directory: Path, stem: str) -> Issued:
    """A certificate and its key from DIR/<stem>.pem and DIR/<stem>-key.pem."""
    cert = x509.load_pem_x509_certificate((directory / f"{stem}.pem").read_bytes())
    key = serialization.load_pem_private_key((directory / f"{stem}-key.pem").read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{stem}-key.pem is not an EC key")
    return Issued(cert, key)


def make_crl(ca: Issued, serials: list[int], days: int = 30) -> bytes:
    """A PEM CRL signed by ca revoking the given certificate serial numbers."""
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + days * DAY)
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def revoke(directory: Path, cert_paths: list[Path]) -> Path:
    """Add certificates to DIR/crl.pem (made if missing), signed by DIR's CA; returns the CRL's path."""
    ca = load(directory, "ca")
    crl_path = directory / "crl.pem"
    revoked = [x509.load_pem_x509_certificate(p.read_bytes()) for p in cert_paths]
    serials = {c.serial_number for c in revoked}
    if crl_path.exists():
        old = x509.load_pem_x509_crl(crl_path.read_bytes())
        keep = [r.serial_number for r in old if r.serial_number not in serials]
    else:
        keep = []
    tmp = crl_path.with_suffix(".tmp")
    tmp.write_bytes(make_crl(ca, [*keep, *sorted(serials)]))
    tmp.replace(crl_path)
    return crl_path
