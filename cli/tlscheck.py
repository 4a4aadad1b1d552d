"""Say which of jobctl's TLS files is wrong, after grpc refused them (imports cryptography only then)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path


def diagnose(ca_path: Path, cert_path: Path, key_path: Path) -> str | None:
    """One line naming the file that cannot work and why; None when the files look right."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        x509.load_pem_x509_certificates(ca_path.read_bytes())
    except (ValueError, OSError) as e:
        return f"CA certificate {ca_path} is not a valid PEM certificate ({e}) (set --ca-cert or JOBCTL_CA_CERT)"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (ValueError, OSError) as e:
        return f"client certificate {cert_path} is not a valid PEM certificate ({e}) (set --client-cert)"
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except TypeError:
        return f"client key {key_path} is encrypted with a passphrase; jobctl needs an unencrypted key"
    except (ValueError, OSError, UnsupportedAlgorithm) as e:
        return f"client key {key_path} is not a valid PEM private key ({e}) (set --client-key)"
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, pub) != cert.public_key().public_bytes(enc, pub):
        return f"client key {key_path} does not match the client certificate {cert_path}"
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc < now:
        return f"client certificate {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    if cert.not_valid_before_utc > now:
        return f"client certificate {cert_path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
    return None
