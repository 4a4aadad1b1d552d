"""A real jobsvc server process for system tests, with a real dev PKI and extra hostile certificates."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from jobsvc import pki
from jobsvc._pb import jobs_pb2_grpc

BIN = Path(sys.executable).parent

# How much slower this host may be than an ordinary one: the emulated VM guest sets more (vm/harness.py). It scales
# the upper bounds of waits (a test never waits for a bound when the progress it needs comes sooner).
TIME_SCALE = max(1.0, float(os.environ.get("JOBSVC_TEST_TIME_SCALE") or 1))


def bound(seconds: float) -> float:
    """The upper bound of a wait on this host: seconds on an ordinary host, more on a slow one."""
    return seconds * TIME_SCALE


@dataclass
class Pki:
    dir: Path

    def cert(self, user: str) -> Path:
        return self.dir / f"{user}.pem"

    def key(self, user: str) -> Path:
        return self.dir / f"{user}-key.pem"

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"


def make_pki(directory: Path) -> Pki:
    """alice and bob from `jobsvc pki init`, plus certificates a hostile client might present."""
    subprocess.run(
        [BIN / "jobsvc", "pki", "init", str(directory), "--user", "alice", "--user", "bob"],
        check=True,
        capture_output=True,
    )
    ca = pki.Issued(
        x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes()),
        serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), None),  # type: ignore[arg-type]
    )
    now = dt.datetime.now(dt.UTC)
    # Another CA with the very same name as ours: only the signature tells them apart.
    impostor = pki.make_ca(ca.cert.subject)
    extra = {
        "mallory": pki.issue(impostor, "alice"),
        "expired": pki.issue(ca, "alice", not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)),
        "notyet": pki.issue(ca, "alice", not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=30)),
        "carol": pki.issue(ca, "carol"),
        "alice-acme": pki.issue(ca, pki.name("alice", "Acme")),
        "alice-globex": pki.issue(ca, pki.name("alice", "Globex")),
    }
    for stem, issued in extra.items():
        (directory / f"{stem}.pem").write_bytes(issued.cert_pem)
        (directory / f"{stem}-key.pem").write_bytes(issued.key_pem)
    return Pki(directory)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    pki: Pki
    state_dir: Path
    log_path: Path
    work_root: Path
    stopped: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self, user: str = "alice", ready: bool = True) -> grpc.Channel:
        """A channel as user; by default connected first, so that a transient connection failure under load (the
        machine is shared with benchmarks) is retried by grpc instead of failing the test's first call."""
        creds = grpc.ssl_channel_credentials(
            self.pki.ca.read_bytes(), self.pki.key(user).read_bytes(), self.pki.cert(user).read_bytes()
        )
        channel = grpc.secure_channel(self.target, creds)
        if ready:
            grpc.channel_ready_future(channel).result(timeout=bound(30))
        return channel

    def stub(self, user: str = "alice") -> jobs_pb2_grpc.JobServiceStub:
        return jobs_pb2_grpc.JobServiceStub(self.channel(user))

    def fds(self) -> set[str]:
        return set(os.listdir(f"/proc/{self.pid}/fd"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def env(self, user: str = "alice") -> dict[str, str]:
        """Environment that points jobctl at this server as user."""
        return {
            **os.environ,
            "JOBCTL_TARGET": self.target,
            "JOBCTL_CA_CERT": str(self.pki.ca),
            "JOBCTL_CLIENT_CERT": str(self.pki.cert(user)),
            "JOBCTL_CLIENT_KEY": str(self.pki.key(user)),
        }

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(bound(timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.stopped = True
        shutil.rmtree(self.work_root, ignore_errors=True)  # the jobs' working directories go with the server
        return code


def serve_command(keys: Pki, listen: str, state: Path, work_root: Path) -> list[str]:
    """The `jobsvc serve` command line for a test server."""
    return [
        str(BIN / "jobsvc"),
        "serve",
        "--listen",
        listen,
        "--state-dir",
        str(state),
        "--work-root",
        str(work_root),
        "--ca-cert",
        str(keys.ca),
        "--server-cert",
        str(keys.dir / "server.pem"),
        "--server-key",
        str(keys.dir / "server-key.pem"),
    ]


def start_server(
    tmp: Path, keys: Pki, *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> Server:
    """A server on a free port; prefix runs before it and must exec it (e.g. prlimit), so the pid is the server's."""
    state = tmp / "state"
    log_path = tmp / "server.log"
    n = 1
    while log_path.exists():  # a restarted server keeps its predecessor's log
        n += 1
        log_path = tmp / f"server-{n}.log"
    # jobs' working directories must be enterable by their own uids, so not under pytest's private tmp
    work_root = Path(tempfile.mkdtemp(prefix="jobsvc-test-", dir="/var/tmp"))
    proc = subprocess.Popen(
        [*prefix, *serve_command(keys, "127.0.0.1:0", state, work_root), *args],
        stdout=subprocess.PIPE,
        env=env,
        stderr=log_path.open("wb"),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("jobsvc listening on "):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}\n{log_path.read_text()}")
    port = int(line.rsplit(":", 1)[1])
    server = Server(proc, port, keys, state, log_path, work_root)
    deadline = time.monotonic() + bound(10)
    while time.monotonic() < deadline:  # ready when a handshake with a real client succeeds
        try:
            grpc.channel_ready_future(server.channel(ready=False)).result(timeout=1)
            break
        except grpc.FutureTimeoutError:
            continue
    return server
