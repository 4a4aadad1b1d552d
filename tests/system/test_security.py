"""Attacks on a real server over real sockets: TLS policy, certificates, identity, job isolation, quotas, audit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from jobsvc._pb import jobs_pb2 as pb
from jobsvc._pb import jobs_pb2_grpc
from tests.system.conftest import processes_in_cgroup_named
from tests.system.server import Pki, Server, bound, start_server

PY = "/usr/bin/python3"
MARKER = "JOBSVC_SERVER_SECRET_MARKER"


@pytest.fixture(scope="module")
def hardened(tmp_path_factory: pytest.TempPathFactory, keys: Pki) -> Iterator[Server]:
    """A server with an admin (carol) and a marker in its own environment that no job may see."""
    env = {**os.environ, MARKER: "do-not-leak"}
    srv = start_server(tmp_path_factory.mktemp("hardened"), keys, "--admin", "CN=carol", env=env)
    yield srv
    assert srv.stop() == 0, srv.log()
    shutil.rmtree(srv.work_root, ignore_errors=True)


def first_line(server: Server, job_id: str, user: str = "alice") -> bytes:
    for msg in server.stub(user).Stream(pb.StreamRequest(id=job_id)):
        line: bytes = msg.data.split(b"\n")[0]
        return line
    raise AssertionError("no output")


def output(server: Server, job_id: str, user: str = "alice") -> bytes:
    return b"".join(m.data for m in server.stub(user).Stream(pb.StreamRequest(id=job_id)))


# -- TLS policy --------------------------------------------------------------------------------------------------


def _tls(server: Server, version: ssl.TLSVersion, ciphers: str = "ALL", user: str = "alice") -> str | None:
    """Handshake with a raw ssl client; the negotiated cipher, or None when the server refused."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = version
    ctx.set_ciphers(ciphers + ":@SECLEVEL=0")  # let OpenSSL really offer what we ask for
    ctx.load_verify_locations(str(server.pki.ca))
    ctx.load_cert_chain(str(server.pki.cert(user)), str(server.pki.key(user)))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # a client certificate is checked by now
                tls.recv(1)
                return tls.cipher()[0]  # type: ignore[index]
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return None


ALLOWED = ["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"]


@pytest.mark.parametrize("suite", ALLOWED)
def test_tls12_allows_the_ecdhe_aead_suites(server: Server, suite: str) -> None:
    assert _tls(server, ssl.TLSVersion.TLSv1_2, suite) == suite


@pytest.mark.parametrize(
    "suite",
    [
        "ECDHE-ECDSA-AES128-SHA",  # CBC with SHA1
        "ECDHE-ECDSA-AES256-SHA384",  # CBC
        "ECDHE-ECDSA-AES128-SHA256",  # CBC
        "AES128-GCM-SHA256",  # RSA key exchange, no forward secrecy
        "AES256-SHA",  # RSA key exchange, CBC, SHA1
        "ECDHE-RSA-AES128-GCM-SHA256",  # needs an RSA certificate the server must not have
    ],
)
def test_tls12_refuses_weak_suites_with_a_positive_control(server: Server, suite: str) -> None:
    assert _tls(server, ssl.TLSVersion.TLSv1_2, ALLOWED[1]) == ALLOWED[1]  # same client code, allowed suite
    assert _tls(server, ssl.TLSVersion.TLSv1_2, suite) is None


def test_tls13_works(server: Server) -> None:
    assert _tls(server, ssl.TLSVersion.TLSv1_3) is not None


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_1_0_and_1_1_are_refused(server: Server, version: ssl.TLSVersion) -> None:
    assert _tls(server, ssl.TLSVersion.TLSv1_2) is not None
    assert _tls(server, version) is None


# -- client certificates -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cert", "key"),
    [
        ("notyet.pem", "notyet-key.pem"),  # not yet valid
        ("server.pem", "server-key.pem"),  # the server's own certificate: EKU serverAuth only
        ("ca.pem", "ca-key.pem"),  # the CA itself is no client
    ],
)
def test_certificates_unfit_for_a_client_are_refused(server: Server, cert: str, key: str) -> None:
    d = server.pki.dir
    creds = grpc.ssl_channel_credentials(server.pki.ca.read_bytes(), (d / key).read_bytes(), (d / cert).read_bytes())
    stub = jobs_pb2_grpc.JobServiceStub(grpc.secure_channel(server.target, creds))
    with pytest.raises(grpc.RpcError) as err:
        stub.List(pb.ListRequest(), timeout=10)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
    assert server.stub().List(pb.ListRequest()) is not None  # the server still serves good clients


# -- jobs run with least privilege -------------------------------------------------------------------------------


def test_each_job_runs_as_its_own_unprivileged_user(hardened: Server) -> None:
    stub = hardened.stub()
    a = stub.Start(pb.StartRequest(argv=[b"sh", b"-c", b"echo $(id -u) $(id -G); sleep 1000"]))
    b = stub.Start(pb.StartRequest(argv=[b"sh", b"-c", b"echo $(id -u) $(id -G); sleep 1000"]))
    uid_a, *groups_a = first_line(hardened, a.id).split()
    uid_b, *groups_b = first_line(hardened, b.id).split()
    assert uid_a != b"0" and uid_b != b"0" and uid_a != uid_b
    assert 61184 <= int(uid_a) <= 65519 and 61184 <= int(uid_b) <= 65519
    assert groups_a == [uid_a] and groups_b == [uid_b]  # supplementary groups dropped, own gid only
    assert stub.Get(pb.GetRequest(id=a.id)).uid == int(uid_a)
    for job in (a, b):
        stub.Stop(pb.StopRequest(id=job.id, grace_seconds=0))


def test_a_job_cannot_signal_another_users_job(hardened: Server) -> None:
    victim = hardened.stub("bob").Start(pb.StartRequest(argv=[b"sleep", b"1000"]))
    script = (
        f"import os\ntry:\n    os.kill({victim.pid}, 9)\n    print('killed')\n"
        "except PermissionError:\n    print('EPERM')\n"
    )
    attacker = hardened.stub().Start(pb.StartRequest(argv=[PY.encode(), b"-c", script.encode()]))
    assert output(hardened, attacker.id) == b"EPERM\n"
    assert hardened.stub("bob").Get(pb.GetRequest(id=victim.id)).status == pb.JOB_STATUS_RUNNING
    hardened.stub("bob").Stop(pb.StopRequest(id=victim.id, grace_seconds=0))


def test_a_job_cannot_read_the_servers_private_key(hardened: Server) -> None:
    key = hardened.pki.dir / "server-key.pem"
    job = hardened.stub().Start(pb.StartRequest(argv=[b"cat", str(key).encode()]))
    out = output(hardened, job.id)
    done = hardened.stub().Wait(pb.GetRequest(id=job.id))
    # the key is 0600 root's; this test's PKI lies under /tmp, which a job does not even see (its /tmp is its own)
    assert done.exit_code != 0 and b"PRIVATE KEY" not in out
    assert b"Permission denied" in out or b"No such file or directory" in out, out


def test_a_job_sees_only_stdio_and_none_of_the_servers_environment(hardened: Server) -> None:
    probe = (
        "import json, os\n"
        "fds = []\n"
        "for fd in range(0, 1024):\n"
        "    try:\n"
        "        os.fstat(fd)\n"
        "        fds.append(fd)\n"
        "    except OSError:\n"
        "        pass\n"
        "st = os.stat('.')\n"
        "print(json.dumps({'fds': fds, 'env': dict(os.environ), 'cwd': os.getcwd(), 'umask': os.umask(0),\n"
        "                  'cwd_owner': [st.st_uid, st.st_mode & 0o777]}))\n"
    )
    job = hardened.stub().Start(pb.StartRequest(argv=[PY.encode(), b"-S", b"-c", probe.encode()]))
    seen = json.loads(output(hardened, job.id))
    assert seen["fds"] == [0, 1, 2]
    assert MARKER not in seen["env"]
    assert set(seen["env"]) == {"PATH", "LANG", "HOME"}
    workdir = str(hardened.work_root / job.id)
    assert seen["env"]["HOME"] == seen["cwd"] == workdir
    assert seen["umask"] == 0o077
    # the job's own while it runs; root's once it has ended (its uid will run other users' jobs)
    assert seen["cwd_owner"] == [hardened.stub().Get(pb.GetRequest(id=job.id)).uid, 0o700]
    hardened.stub().Wait(pb.GetRequest(id=job.id))
    for _ in range(100):
        st = os.stat(workdir)
        if st.st_uid == 0:
            break
        time.sleep(0.02)
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700)
    stdin = hardened.stub().Start(pb.StartRequest(argv=[b"readlink", b"/proc/self/fd/0"]))
    assert output(hardened, stdin.id) == b"/dev/null\n"


def test_a_setuid_root_binary_does_not_raise_privileges(hardened: Server) -> None:
    suid = hardened.work_root / "suid-id"
    shutil.copy("/usr/bin/id", suid)
    os.chown(suid, 0, 0)
    os.chmod(suid, 0o4755)
    # control: without no_new_privs the bit works on this filesystem (nobody becomes euid 0)
    # (setpriv, not subprocess's user=: a setuid in a vfork child of this threaded process is not safe)
    control = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", suid, "-u"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert control.stdout.strip() == "0"
    # started from its own directory: under /var/tmp, which jobs see privately, but a job's workdir is there
    job = hardened.stub().Start(pb.StartRequest(argv=[b"./suid-id", b"-u"], workdir=str(hardened.work_root)))
    uid = hardened.stub().Get(pb.GetRequest(id=job.id)).uid
    assert output(hardened, job.id) == f"{uid}\n".encode()


# -- authorization -------------------------------------------------------------------------------------------------


def test_an_admin_may_act_on_every_job_and_a_user_may_not(hardened: Server) -> None:
    job = hardened.stub("alice").Start(pb.StartRequest(argv=[b"sh", b"-c", b"echo secret-output; sleep 1000"]))
    carol, bob = hardened.stub("carol"), hardened.stub("bob")
    assert carol.Get(pb.GetRequest(id=job.id)).owner == "CN=alice"
    assert job.id in [j.id for j in carol.List(pb.ListRequest()).jobs]
    assert first_line(hardened, job.id, user="carol") == b"secret-output"
    for call, req in [(bob.Get, pb.GetRequest(id=job.id)), (bob.Stop, pb.StopRequest(id=job.id))]:
        with pytest.raises(grpc.RpcError) as err:
            call(req)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert job.id not in [j.id for j in bob.List(pb.ListRequest()).jobs]
    assert carol.Stop(pb.StopRequest(id=job.id, grace_seconds=0)).status == pb.JOB_STATUS_STOPPED
    assert processes_in_cgroup_named(job.id) == []


# -- quotas --------------------------------------------------------------------------------------------------------


def test_quotas_bound_each_user_and_the_server(tmp_path: Path, keys: Pki) -> None:
    srv = start_server(
        tmp_path, keys, "--max-running-per-user", "2", "--max-running-total", "3", "--max-streams-per-user", "2"
    )
    try:
        alice, bob = srv.stub("alice"), srv.stub("bob")
        sleep = pb.StartRequest(argv=[b"sleep", b"1000"])
        a1, a2 = alice.Start(sleep), alice.Start(sleep)
        with pytest.raises(grpc.RpcError) as err:
            alice.Start(sleep)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "per user" in (err.value.details() or "")
        b1 = bob.Start(sleep)  # bob is not held back by alice's quota
        with pytest.raises(grpc.RpcError) as err:
            bob.Start(sleep)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "on this server" in (
            err.value.details() or ""
        )
        # streams: two live ones per user
        s1 = alice.Stream(pb.StreamRequest(id=a1.id))
        s2 = alice.Stream(pb.StreamRequest(id=a2.id))
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as err:
            list(alice.Stream(pb.StreamRequest(id=a1.id)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "streams" in (err.value.details() or "")
        bob_stream = bob.Stream(pb.StreamRequest(id=b1.id))  # everyone else is still served
        assert bob.Get(pb.GetRequest(id=b1.id)).status == pb.JOB_STATUS_RUNNING
        for s in (s1, s2, bob_stream):
            s.cancel()
        alice.Stop(pb.StopRequest(id=a1.id, grace_seconds=0))
        a3 = alice.Start(sleep)  # a freed slot is usable again
        for job, stub in ((a2, alice), (a3, alice), (b1, bob)):
            stub.Stop(pb.StopRequest(id=job.id, grace_seconds=0))
    finally:
        assert srv.stop() == 0
        shutil.rmtree(srv.work_root, ignore_errors=True)


# -- audit ---------------------------------------------------------------------------------------------------------


def test_every_call_is_in_the_audit_log(hardened: Server) -> None:
    stub = hardened.stub("bob")
    job = stub.Start(pb.StartRequest(argv=[b"echo", b"audited \xff"]))
    stub.Wait(pb.GetRequest(id=job.id))
    with pytest.raises(grpc.RpcError):
        stub.Get(pb.GetRequest(id="not-a-job"))
    time.sleep(0.2)
    lines = [json.loads(line) for line in (hardened.state_dir / "audit.log").read_text().splitlines()]
    start = next(e for e in lines if e["method"] == "Start" and e["job_id"] == job.id)
    assert start["identity"] == "CN=bob" and start["argv"] == ["echo", "audited \\xff"] and start["outcome"] == "OK"
    assert start["time"].endswith("Z") and start["peer"].startswith("ipv4:127.0.0.1:")
    assert any(e["method"] == "Wait" and e["job_id"] == job.id for e in lines)
    assert any(e["method"] == "Get" and e["job_id"] == "not-a-job" and e["outcome"] == "NOT_FOUND" for e in lines)
    assert oct(os.stat(hardened.state_dir / "audit.log").st_mode & 0o777) == oct(0o600)


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + bound(timeout)
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_sighup_reopens_the_audit_log_after_rotation(tmp_path: Path, keys: Pki) -> None:
    srv = start_server(tmp_path, keys)
    try:
        stub = srv.stub()
        audit = srv.state_dir / "audit.log"
        rotated = audit.with_name("audit.log.1")

        def logged(path: Path, job_id: str) -> bool:
            return path.exists() and any(json.loads(line)["job_id"] == job_id for line in path.read_text().splitlines())

        with pytest.raises(grpc.RpcError):
            stub.Get(pb.GetRequest(id="before-rotation"))
        _wait_for(lambda: logged(audit, "before-rotation"), "the call before the rotation is not in the audit log")
        audit.rename(rotated)  # what logrotate does, then it sends SIGHUP
        srv.proc.send_signal(signal.SIGHUP)
        _wait_for(audit.exists, "SIGHUP did not make a new audit log at the original path")
        with pytest.raises(grpc.RpcError):
            stub.Get(pb.GetRequest(id="after-rotation"))
        _wait_for(lambda: logged(audit, "after-rotation"), "the call after SIGHUP is not in the new audit log")
        assert not logged(rotated, "after-rotation") and logged(rotated, "before-rotation")
        assert not logged(audit, "before-rotation")
        assert oct(os.stat(audit).st_mode & 0o777) == oct(0o600)
        assert stub.List(pb.ListRequest()) is not None  # the server goes on serving
    finally:
        assert srv.stop() == 0, srv.log()
        shutil.rmtree(srv.work_root, ignore_errors=True)


# -- the connection reserve ------------------------------------------------------------------------------------------

MAX_CONNECTIONS, RESERVED = 64, 8
ATTACKS = 4
# Long enough that only the reserve, not the handshake timeout, can let a client in: every wait below that proves
# the reserve's work ends before the first silent connection could have reached it (an emulated VM guest is 5-10
# times slower than this host; the reserve counts every 0.5 s).
SLOW_HANDSHAKE = 60


def _closed_by_server(sockets: list[socket.socket]) -> list[socket.socket]:
    """The sockets the server has closed (each reads EOF or a reset at once)."""
    closed = []
    for s in sockets:
        s.setblocking(False)
        try:
            if s.recv(1) == b"":
                closed.append(s)
        except BlockingIOError:
            pass
        except OSError:
            closed.append(s)
    return closed


def _wait_until(condition: Callable[[], bool], deadline: float, what: Callable[[], str]) -> None:
    """Until condition holds, which it must before deadline: the time is read after each look, so what it saw
    happened before then."""
    while True:
        met = condition()
        assert time.monotonic() < deadline, what()
        if met:
            return
        time.sleep(0.05)


def test_silent_connections_leave_the_reserve_to_clients_with_a_certificate(tmp_path: Path, keys: Pki) -> None:
    # max-connections silent TCP connections: without the reserve grpc holds every one of them until the handshake
    # timeout and closes every new connection at accept, so no client, certificate or not, can connect meanwhile.
    srv = start_server(
        tmp_path,
        keys,
        "--max-connections",
        str(MAX_CONNECTIONS),
        "--reserved-connections",
        str(RESERVED),
        "--handshake-timeout",
        f"{SLOW_HANDSHAKE}s",
    )
    silent: list[socket.socket] = []

    def state(what: str) -> str:
        held = len(silent) - len(_closed_by_server(silent))
        return f"{what}: {held} of {len(silent)} silent connections held; server log:\n{srv.log()}"

    try:
        established = srv.stub()
        assert established.List(pb.ListRequest(), timeout=30) is not None  # authenticated before the flood
        assert "connection reserve unavailable" not in srv.log(), srv.log()
        # an attacker who keeps max-connections silent connections open: it replaces each one the server closes,
        # a few times over (as one reconnecting at every handshake timeout would)
        attack_began = time.monotonic()
        # no silent connection (the first opened now) can reach the handshake timeout before this
        by_the_reserve = attack_began + SLOW_HANDSHAKE
        for _ in range(ATTACKS):
            for s in _closed_by_server(silent):
                silent.remove(s)
                s.close()
            while len(silent) < MAX_CONNECTIONS:
                silent.append(socket.create_connection(("127.0.0.1", srv.port), timeout=30))
            time.sleep(0.5)  # the attacker's pace, not an assertion
        # the server keeps only the unreserved part for them (grpc itself closes at accept only those past
        # --max-connections, which counts the established client too: one)
        _wait_until(
            lambda: len(_closed_by_server(silent)) >= RESERVED,
            by_the_reserve,
            lambda: state("the silent ones beyond the unreserved part were not closed"),
        )
        # ... and no more than those: the silent ones still fill the unreserved part
        held = len(silent) - len(_closed_by_server(silent))
        assert held >= (MAX_CONNECTIONS - RESERVED) // 2, state("the reserve closed more than the excess")
        # a client with a certificate connects while the silent ones fill the unreserved part, and is served
        creds = grpc.ssl_channel_credentials(
            keys.ca.read_bytes(), keys.key("bob").read_bytes(), keys.cert("bob").read_bytes()
        )
        with grpc.secure_channel(srv.target, creds) as fresh:
            stub = jobs_pb2_grpc.JobServiceStub(fresh)
            left = by_the_reserve - time.monotonic()
            assert left > 0, state("no time left to connect before the handshake timeout")
            job = stub.Start(pb.StartRequest(argv=[b"true"]), timeout=left, wait_for_ready=True)
            assert stub.Wait(pb.GetRequest(id=job.id), timeout=60).exit_code == 0
            assert established.List(pb.ListRequest(), timeout=30) is not None  # not closed as if it were silent
        assert "without an authenticated call over the" in srv.log()
        # and the silent ones the server kept are closed at the handshake timeout
        _wait_until(
            lambda: len(_closed_by_server(silent)) == len(silent),
            time.monotonic() + 3 * SLOW_HANDSHAKE,
            lambda: state("the silent connections were not closed at the handshake timeout"),
        )
    finally:
        for s in silent:
            s.close()
        assert srv.stop() == 0, srv.log()
        shutil.rmtree(srv.work_root, ignore_errors=True)
