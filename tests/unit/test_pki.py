"""`jobsvc pki init`: what it writes, with which usages and modes, and that it never overwrites."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from jobsvc import pki
from jobsvc.cmd import main


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_writes_a_ca_a_server_and_one_client_per_user(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    result = CliRunner().invoke(main, ["pki", "init", str(d), "--user", "alice", "--user", "bob"])
    assert result.exit_code == 0, result.output
    names = {p.name for p in d.iterdir()}
    assert names == {f"{s}{k}.pem" for s in ("ca", "server", "alice", "bob") for k in ("", "-key")}
    for key in d.glob("*-key.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ca, server, alice = load(d / "ca.pem"), load(d / "server.pem"), load(d / "alice.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert list(alice.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert alice.subject.rfc4514_string() == "CN=alice"
    assert isinstance(alice.public_key(), ec.EllipticCurvePublicKey)
    assert alice.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert alice.issuer == ca.subject


def test_init_refuses_to_overwrite_and_changes_nothing(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    assert CliRunner().invoke(main, ["pki", "init", str(d), "--user", "alice"]).exit_code == 0
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    again = CliRunner().invoke(main, ["pki", "init", str(d), "--user", "alice", "--user", "carol"])
    assert again.exit_code == 1 and "refusing to overwrite" in again.output
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # carol was not written either


@pytest.mark.parametrize("bad", ["", "../x", ".hidden", "ca", "server"])
def test_init_refuses_bad_user_names(tmp_path: Path, bad: str) -> None:
    result = CliRunner().invoke(main, ["pki", "init", str(tmp_path / "pki"), "--user", bad])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert not (tmp_path / "pki").exists()


def test_add_user_uses_the_existing_ca_and_never_overwrites(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    assert CliRunner().invoke(main, ["pki", "init", str(d), "--user", "alice"]).exit_code == 0
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    result = CliRunner().invoke(main, ["pki", "add-user", str(d), "carol", "dave"])
    assert result.exit_code == 0, result.output
    assert result.output.split() == [str(d / n) for n in ("carol.pem", "carol-key.pem", "dave.pem", "dave-key.pem")]
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.name in before} == before  # CA and alice untouched
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    carol = pki.load(d, "carol")
    assert carol.cert.issuer == ca.subject
    carol.cert.verify_directly_issued_by(ca)  # signed by the existing CA, not a new one
    assert carol.cert.subject.rfc4514_string() == "CN=carol"
    assert isinstance(carol.key, ec.EllipticCurvePrivateKey)
    assert stat.S_IMODE((d / "carol-key.pem").stat().st_mode) == 0o600

    again = CliRunner().invoke(main, ["pki", "add-user", str(d), "carol"])
    assert again.exit_code == 1 and "refusing to overwrite" in again.output and str(d / "carol.pem") in again.output
    assert pki.load(d, "carol").cert == carol.cert
    for bad in ("ca", "../x", ""):
        assert CliRunner().invoke(main, ["pki", "add-user", str(d), bad]).exit_code == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = CliRunner().invoke(main, ["pki", "add-user", str(empty), "carol"])
    assert missing.exit_code == 1 and "pki init" in missing.output and not (empty / "carol.pem").exists()
