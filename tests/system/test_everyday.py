"""Day-two features through the real jobctl against a real server: env, workdir, timeouts, signals, stream
controls, resuming, list filters, revocation and reload, contexts, completion."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from jobsvc import pki
from jobsvc._pb import jobs_pb2 as pb
from tests.system.server import BIN, Pki, Server, start_server

JOBCTL = str(BIN / "jobctl")


def jobctl(
    server: Server, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([JOBCTL, *args], env={**server.env(), **(env or {})}, capture_output=True, timeout=timeout)


def ok(server: Server, *args: str) -> str:
    proc = jobctl(server, *args)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def failed(proc: subprocess.CompletedProcess[bytes], code: int = 1) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err
    return err


def wait_for_output(server: Server, job_id: str, marker: bytes, seconds: float = 10) -> None:
    """Until the job's stdout so far holds marker (jobctl stream --no-follow returns what exists now)."""
    deadline = time.monotonic() + seconds
    while marker not in jobctl(server, "stream", "--no-follow", "--id", job_id).stdout:
        assert time.monotonic() < deadline, f"no {marker!r} from job {job_id} within {seconds} s"
        time.sleep(0.05)


def test_env_and_env_file(server: Server, tmp_path: Path) -> None:
    env_file = tmp_path / "job.env"
    env_file.write_text("# settings\nGREETING=hello from a file\nNAME=file\n")
    run = jobctl(
        server,
        "run",
        "--env-file",
        str(env_file),
        "-e",
        "NAME=flag",
        "--env",
        "EMPTY=",
        "--",
        "sh",
        "-c",
        'echo "$GREETING/$NAME/${EMPTY-unset}/$PATH"',
    )
    assert run.returncode == 0
    assert run.stdout.decode().startswith("hello from a file/flag//")
    denied = failed(jobctl(server, "start", "-e", "LD_PRELOAD=/tmp/evil.so", "--", "true"))
    assert "LD_PRELOAD is not allowed" in denied
    assert "NAME=VALUE" in failed(jobctl(server, "start", "-e", "novalue", "--", "true"), code=2)


def test_workdir(server: Server) -> None:
    assert jobctl(server, "run", "--workdir", "/tmp", "--", "pwd").stdout == b"/tmp\n"
    fresh = jobctl(server, "run", "--", "pwd").stdout.decode().strip()
    assert fresh.startswith(str(server.work_root)) and fresh != str(server.work_root)
    err = failed(jobctl(server, "start", "--workdir", "/root", "--", "true"))  # root's home is 0700
    assert "cannot enter working directory '/root'" in err and "Permission denied" in err
    assert "absolute" in failed(jobctl(server, "start", "--workdir", "relative/dir", "--", "true"))
    assert "No such file" in failed(jobctl(server, "start", "--workdir", "/no/such/dir", "--", "true"))


def test_timeout_stops_the_job(server: Server) -> None:
    job_id = ok(server, "start", "--timeout", "1s", "--", "sh", "-c", "echo up; sleep 100").strip()
    assert jobctl(server, "wait", "--id", job_id, timeout=30).returncode == 128 + signal.SIGTERM
    record = json.loads(ok(server, "get", "--json", "--id", job_id))
    assert record["status"] == "stopped" and record["reason"] == "timeout" and record["timeout_seconds"] == 1.0
    started, ended = record["started_at"], record["ended_at"]
    assert started < ended
    assert "timeout" in failed(jobctl(server, "start", "--timeout", "0s", "--", "true"), code=2)


def test_server_timeout_defaults_and_maximum(tmp_path: Path, keys: Pki) -> None:
    srv = start_server(tmp_path, keys, "--default-timeout", "1s", "--max-timeout", "1h")
    try:
        job_id = ok(srv, "start", "--", "sleep", "100").strip()
        assert jobctl(srv, "wait", "--id", job_id, timeout=30).returncode == 128 + signal.SIGTERM
        assert json.loads(ok(srv, "get", "--json", "--id", job_id))["reason"] == "timeout"
        assert "maximum of 3600" in failed(jobctl(srv, "start", "--timeout", "2h", "--", "true"))
    finally:
        assert srv.stop() == 0
        shutil.rmtree(srv.work_root, ignore_errors=True)


def test_stop_with_another_first_signal(server: Server) -> None:
    script = "trap 'echo got INT; exit 3' INT; echo ready; while :; do sleep 0.05; done"
    job_id = ok(server, "start", "--", "sh", "-c", script).strip()
    wait_for_output(server, job_id, b"ready")
    record = json.loads(ok(server, "stop", "--json", "--signal", "INT", "--grace", "5", "--id", job_id))
    assert record["status"] == "stopped" and record["exit_code"] == 3
    assert jobctl(server, "stream", "--id", job_id).stdout == b"ready\ngot INT\n"
    assert "unknown signal" in failed(jobctl(server, "stop", "--signal", "NOPE", "--id", job_id), code=2)


def test_stream_controls(server: Server) -> None:
    script = "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done; sleep 1000"
    job_id = ok(server, "start", "--", "sh", "-c", script).strip()
    wait_for_output(server, job_id, b"out5")
    now = jobctl(server, "stream", "--no-follow", "--id", job_id, timeout=20)  # returns while the job runs on
    assert now.returncode == 0
    assert now.stdout == b"out1\nout2\nout3\nout4\nout5\n" and now.stderr == b"err1\nerr2\nerr3\nerr4\nerr5\n"
    only_err = jobctl(server, "stream", "--no-follow", "--stderr", "--id", job_id)
    assert (only_err.stdout, only_err.stderr) == (b"", b"err1\nerr2\nerr3\nerr4\nerr5\n")
    only_out = jobctl(server, "stream", "--no-follow", "--stdout", "--id", job_id)
    assert (only_out.stdout, only_out.stderr) == (b"out1\nout2\nout3\nout4\nout5\n", b"")
    tail = jobctl(server, "stream", "--no-follow", "--stdout", "--tail", "2", "--id", job_id)
    assert tail.stdout == b"out4\nout5\n"
    tail_both = jobctl(server, "stream", "--no-follow", "--tail", "3", "--id", job_id)
    # the last 3 lines in the order the server read the two pipes
    combined = b"".join(m.data for m in server.stub().Stream(pb.StreamRequest(id=job_id, no_follow=True)))
    last3 = combined.splitlines(keepends=True)[-3:]
    assert sorted((tail_both.stdout + tail_both.stderr).splitlines(keepends=True)) == sorted(last3)
    ok(server, "stop", "--grace", "0", "--id", job_id)


class FlakyProxy:
    """A TCP proxy to the server that can cut every connection at once (the network dropping)."""

    def __init__(self, target_port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        self.conns: list[socket.socket] = []
        self.silent: set[socket.socket] = set()  # what comes from these is dropped (a path that lost its state)
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                if a not in self.silent:
                    b.sendall(data)
        except OSError:
            pass
        if a in self.silent or b in self.silent:  # a path that lost its state tells neither end anything
            return
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Reset every connection (RST to both ends)."""
        with self.lock:
            conns, self.conns = self.conns, []
            self.silent.clear()
        for s in conns:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
            # close() alone sends nothing while a _pipe thread is blocked in recv() on s (the kernel frees the
            # socket when that call returns, which may be never): shutdown wakes it first
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RD)
            s.close()

    def go_silent(self) -> None:
        """Forward nothing more on the connections open now, and keep them open: neither end hears of it."""
        with self.lock:
            self.silent.update(self.conns)

    def close(self) -> None:
        self.listener.close()
        self.cut()


def test_stream_timestamps_and_since(server: Server) -> None:
    import datetime as dt

    # "early" is read before the job waits for the test; "late" after the test has noted a moment
    job_id = ok(server, "start", "--", "sh", "-c", "echo early; while [ ! -e go ]; do sleep 0.05; done; echo late")
    job_id = job_id.strip()
    wait_for_output(server, job_id, b"early")
    time.sleep(0.3)  # more than the 0.1 s a timestamp is rounded to
    moment = dt.datetime.now(dt.UTC)
    time.sleep(0.3)
    workdir = json.loads(ok(server, "get", "--json", job_id))["workdir"]
    (Path(workdir) / "go").touch()
    ok(server, "wait", job_id)
    since = jobctl(server, "stream", job_id, "--since", moment.isoformat().replace("+00:00", "Z"))
    assert (since.returncode, since.stdout, since.stderr) == (0, b"late\n", b"")  # only what was read after it
    assert jobctl(server, "stream", job_id, "--since", "1h").stdout == b"early\nlate\n"
    stamped = jobctl(server, "stream", job_id, "--timestamps")
    lines = stamped.stdout.decode().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["early", "late"]
    early, late = (dt.datetime.fromisoformat(line.split(" ", 1)[0].replace("Z", "+00:00")) for line in lines)
    assert early < moment < late, (early, moment, late)  # each line carries when the server read it


class Drain:
    """A child's stdout and stderr as they come, read with a deadline: a jobctl that never ends fails the test
    with what it wrote (and is killed) rather than holding it until pytest's timeout."""

    def __init__(self, proc: subprocess.Popen[bytes], seconds: float = 120) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.proc = proc
        self.deadline = time.monotonic() + seconds
        self.sel = selectors.DefaultSelector()
        self.got = {proc.stdout.fileno(): b"", proc.stderr.fileno(): b""}
        self.out_fd, self.err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        for fd in self.got:
            self.sel.register(fd, selectors.EVENT_READ)

    def until(self, done: Callable[[bytes, bytes], bool] | None) -> tuple[bytes, bytes]:
        """Read until done(stdout, stderr) holds, or (done None) both have ended; what came so far."""
        while self.sel.get_map() and not (done and done(self.got[self.out_fd], self.got[self.err_fd])):
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"jobctl did not end: stdout {self.got[self.out_fd]!r}, stderr {self.got[self.err_fd]!r}")
            for key, _ in self.sel.select(left):
                data = os.read(key.fd, 65536)  # (not the Popen's buffered files: nothing is read ahead there)
                if data:
                    self.got[key.fd] += data
                else:
                    self.sel.unregister(key.fd)
        return self.got[self.out_fd], self.got[self.err_fd]


def stream_through(proxy: FlakyProxy, server: Server, job_id: str) -> tuple[subprocess.Popen[bytes], Drain]:
    """`jobctl stream` of job_id through proxy, its output drained as it comes."""
    watcher = subprocess.Popen(
        [JOBCTL, "--target", f"127.0.0.1:{proxy.port}", "stream", "--id", job_id],
        env=server.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return watcher, Drain(watcher)


def test_stream_resumes_after_a_dropped_connection(server: Server) -> None:
    proxy = FlakyProxy(server.port)
    try:
        script = "for i in $(seq 1 60); do echo line-$i; sleep 0.05; done"
        job_id = ok(server, "start", "--", "sh", "-c", script).strip()
        watcher, output = stream_through(proxy, server, job_id)
        output.until(lambda out, _err: b"line-1\n" in out)
        time.sleep(0.5)
        proxy.cut()
        out, err = output.until(None)
        assert watcher.wait(60) == 0, err
        assert out == b"".join(b"line-%d\n" % i for i in range(1, 61))  # no gap, no repeat
        assert b"was lost" in err and b"to resume at byte" in err and b"reconnected after" in err
    finally:
        proxy.close()


def test_stream_resumes_after_its_connection_goes_silent(server: Server) -> None:
    # a NAT or load balancer that lost the connection's state: no RST, no FIN, nothing comes any more; only
    # jobctl's keepalive pings find out
    proxy = FlakyProxy(server.port)
    try:
        job_id = ok(server, "start", "--", "sh", "-c", "echo first; exec sleep 600").strip()
        watcher, output = stream_through(proxy, server, job_id)
        output.until(lambda out, _err: b"first\n" in out)
        proxy.go_silent()
        output.until(lambda _out, err: b"was lost" in err)
        ok(server, "stop", "--grace", "0", "--id", job_id)
        out, err = output.until(None)
        assert watcher.wait(60) == 0, err
        assert out == b"first\n"
        assert b"to resume at byte 6" in err and b"reconnected after" in err
    finally:
        proxy.close()


def test_list_filters(server: Server) -> None:
    running = ok(server, "start", "--", "sleep", "1000").strip()
    finished = ok(server, "start", "--", "true").strip()
    jobctl(server, "wait", "--id", finished)

    def ids(*a: str) -> list[str]:
        return [r["id"] for r in json.loads(ok(server, "list", "--json", *a))]

    assert running in ids("--status", "running") and finished not in ids("--status", "running")
    assert finished in ids("--status", "finished") and running not in ids("--status", "finished")
    recent = ids("--since", "1m")
    assert running in recent and finished in recent
    time.sleep(1.2)
    assert running not in ids("--since", "1s")
    ok(server, "stop", "--grace", "0", "--id", running)


def test_revocation_deny_list_and_reload_keep_streams(tmp_path: Path, keys: Pki) -> None:
    d = keys.dir
    ca = pki.load(d, "ca")
    for name in ("eve", "mal"):
        issued = pki.issue(ca, name)
        (d / f"{name}.pem").write_bytes(issued.cert_pem)
        (d / f"{name}-key.pem").write_bytes(issued.key_pem)
    crl = tmp_path / "crl.pem"
    crl.write_bytes(pki.make_crl(ca, []))
    deny = tmp_path / "deny.txt"
    deny.write_text("# nobody yet\n")
    srv = start_server(tmp_path, keys, "--crl", str(crl), "--deny-file", str(deny), "--deny-subject", "CN=mal")
    try:

        def code_of(user: str) -> grpc.StatusCode:
            try:
                srv.stub(user).List(pb.ListRequest(), timeout=10)
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return e.code()

        assert code_of("eve") == grpc.StatusCode.OK
        assert code_of("bob") == grpc.StatusCode.OK
        assert code_of("mal") == grpc.StatusCode.PERMISSION_DENIED
        # alice watches a live job over an established connection while the trust changes
        job = srv.stub().Start(
            pb.StartRequest(argv=[b"sh", b"-c", b"for i in $(seq 1 40); do echo $i; sleep 0.1; done"])
        )
        stream = srv.stub().Stream(pb.StreamRequest(id=job.id))
        assert next(stream).data.startswith(b"1\n")
        eve_serial = x509.load_pem_x509_certificate((d / "eve.pem").read_bytes()).serial_number
        crl.write_bytes(pki.make_crl(ca, [eve_serial]))
        deny.write_text("CN=bob\n")
        new_server = pki.issue(ca, "localhost", server=True, client=False, dns=("localhost",), ips=("127.0.0.1",))
        (d / "server.pem").write_bytes(new_server.cert_pem)
        (d / "server-key.pem").write_bytes(new_server.key_pem)
        srv.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert "reloaded" in srv.log()
        rest = b"".join(m.data for m in stream)  # the established stream went on to the end
        assert b"40\n" in rest
        assert code_of("eve") == grpc.StatusCode.UNAUTHENTICATED  # revoked
        assert code_of("bob") == grpc.StatusCode.PERMISSION_DENIED  # denied
        assert code_of("alice") == grpc.StatusCode.OK
        err = jobctl(
            srv, "list", env={"JOBCTL_CLIENT_CERT": str(d / "eve.pem"), "JOBCTL_CLIENT_KEY": str(d / "eve-key.pem")}
        )
        assert "revoked" in failed(err)
        # new connections get the new server certificate
        import ssl

        ctx = ssl.create_default_context(cafile=str(keys.ca))
        ctx.load_cert_chain(str(keys.cert("alice")), str(keys.key("alice")))
        ctx.set_alpn_protocols(["h2"])
        with (
            socket.create_connection(("127.0.0.1", srv.port)) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            seen = tls.getpeercert(binary_form=True)
        assert seen == new_server.cert.public_bytes(serialization.Encoding.DER)
        # a broken file on reload keeps what is in force
        crl.write_text("garbage")
        srv.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert "reload failed" in srv.log() and code_of("alice") == grpc.StatusCode.OK
    finally:
        assert srv.stop() == 0
        shutil.rmtree(srv.work_root, ignore_errors=True)


@pytest.fixture
def config_home(tmp_path: Path, server: Server) -> Iterator[Path]:
    home = tmp_path / "xdg"
    (home / "jobctl").mkdir(parents=True)
    pki_dir = server.pki.dir
    (home / "jobctl" / "config.toml").write_text(
        'current_context = "down"\n\n'
        f'[contexts.local]\ntarget = "{server.target}"\nca_cert = "{pki_dir}/ca.pem"\n'
        f'client_cert = "{pki_dir}/alice.pem"\nclient_key = "{pki_dir}/alice-key.pem"\n\n'
        f'[contexts.down]\ntarget = "127.0.0.1:1"\nca_cert = "{pki_dir}/ca.pem"\n'
        f'client_cert = "{pki_dir}/alice.pem"\nclient_key = "{pki_dir}/alice-key.pem"\n'
    )
    yield home


def bare(config_home: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """jobctl with no JOBCTL_* variables: only the config file points it anywhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCTL_")}
    env["XDG_CONFIG_HOME"] = str(config_home)
    return subprocess.run([JOBCTL, *args], env=env, capture_output=True, timeout=60)


def test_contexts(config_home: Path, server: Server) -> None:
    listing = bare(config_home, "context", "list").stdout.decode()
    assert "* down\t127.0.0.1:1" in listing and "  local\t" + server.target in listing
    assert "cannot reach jobsvc at 127.0.0.1:1" in failed(bare(config_home, "list"))  # the current context
    job_id = bare(config_home, "--context", "local", "start", "--", "echo", "ctx").stdout.decode().strip()
    assert len(job_id) == 36
    assert b"ctx" in bare(config_home, "--context", "local", "stream", "--id", job_id).stdout
    assert bare(config_home, "context", "use", "local").stdout == b"current context: local\n"
    assert "* local" in bare(config_home, "context", "list").stdout.decode()
    assert job_id in bare(config_home, "list").stdout.decode()[:0] + bare(config_home, "list", "--json").stdout.decode()
    # a flag (or variable) still wins over the context
    assert "127.0.0.1:1" in failed(bare(config_home, "--target", "127.0.0.1:1", "list"))
    assert "no context 'nope'" in failed(bare(config_home, "--context", "nope", "list"))
    assert "no context 'nope'" in failed(bare(config_home, "context", "use", "nope"))
    everywhere = bare(config_home, "list", "--all-contexts")
    assert everywhere.returncode == 0
    header, *rows = everywhere.stdout.decode().splitlines()
    assert header.split()[:2] == ["CONTEXT", "ID"]
    assert any(row.startswith("local") and job_id[:8] in row for row in rows)
    assert "context down: cannot reach jobsvc" in everywhere.stderr.decode()


def test_completion_of_job_ids_and_contexts(config_home: Path, server: Server) -> None:
    job_id = ok(server, "start", "--", "true").strip()

    def complete(words: str) -> str:
        env = {
            **server.env(),
            "XDG_CONFIG_HOME": str(config_home),
            "_JOBCTL_COMPLETE": "bash_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split(" ")) - 1),
        }
        return subprocess.run([JOBCTL], env=env, capture_output=True, timeout=30).stdout.decode()

    assert job_id in complete(f"jobctl get --id {job_id[:6]}")
    assert "local" in complete("jobctl context use lo") and "down" not in complete("jobctl context use lo")


def test_all_contexts_and_completion_resolve_settings_like_every_command(config_home: Path, server: Server) -> None:
    # issue 18: --all-contexts ignored --ca-cert (then said to set it), and completion ignored the context
    job_id = ok(server, "start", "--", "true").strip()
    config = config_home / "jobctl" / "config.toml"
    config.write_text(config.read_text().replace(f'ca_cert = "{server.pki.dir}/ca.pem"', 'ca_cert = "/no/ca.pem"'))
    assert "CA certificate /no/ca.pem" in bare(config_home, "list", "--all-contexts").stderr.decode()
    everywhere = bare(config_home, "--ca-cert", str(server.pki.ca), "list", "--all-contexts")
    assert everywhere.returncode == 0, everywhere.stderr
    assert any(row.startswith("local") and job_id[:8] in row for row in everywhere.stdout.decode().splitlines())

    def complete(*words: str, **env: str) -> str:
        variables = {k: v for k, v in os.environ.items() if not k.startswith("JOBCTL_")}
        variables.update(XDG_CONFIG_HOME=str(config_home), _JOBCTL_COMPLETE="bash_complete", **env)
        variables.update(COMP_WORDS=" ".join(["jobctl", *words]), COMP_CWORD=str(len(words)))
        return subprocess.run([JOBCTL], env=variables, capture_output=True, timeout=30).stdout.decode()

    ca = str(server.pki.ca)
    assert job_id in complete("--context", "local", "--ca-cert", ca, "get", "--id", job_id[:6])
    assert job_id in complete("get", job_id[:6], JOBCTL_CONTEXT="local", JOBCTL_CA_CERT=ca)
    assert job_id not in complete("--ca-cert", ca, "get", job_id[:6])  # the current context, down, is asked
    assert job_id not in complete("--context", "local", "get", job_id[:6])  # its CA file does not exist


def test_get_says_when_a_job_hit_its_pids_limit(server: Server) -> None:
    storm = "for i in $(seq 1 30); do sleep 5 & done 2>/dev/null; wait; true"
    job_id = ok(server, "start", "--pids", "8", "--", "sh", "-c", storm).strip()
    jobctl(server, "wait", job_id)  # its exit code is the job's (sh may give up when a fork fails)
    shown = ok(server, "get", job_id)
    assert "pids limit: hit: the kernel refused a fork of this job at its limit of 8" in shown, shown
    assert json.loads(ok(server, "get", "--json", job_id))["pids_limit_hit"] is True
    calm = ok(server, "start", "--pids", "8", "--", "true").strip()
    ok(server, "wait", calm)
    assert "pids limit" not in ok(server, "get", calm)
