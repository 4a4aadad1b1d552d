"""jobctl at its edges (issue 17), through the real jobctl process against real servers: one line for every
mistake, streams that resume across a server restart, what run says and does, make run as non-root, pki add-user."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.server import BIN, Pki, Server, start_server

JOBCTL = str(BIN / "jobctl")
REPO = Path(__file__).resolve().parents[2]


def jobctl(
    server: Server, *args: str, user: str = "alice", env: dict[str, str] | None = None, **kw: object
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(  # type: ignore[no-any-return]
        [JOBCTL, *args], env={**server.env(user), **(env or {})}, capture_output=True, timeout=120, **kw
    )  # type: ignore[call-overload]


def ok(server: Server, *args: str) -> str:
    proc = jobctl(server, *args)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def one_line(proc: subprocess.CompletedProcess[bytes], code: int = 1) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err
    if code == 1:
        assert err.count("\n") == 1 and err.startswith("error: "), err
    else:
        assert err.startswith("Usage: jobctl") and "\nError: " in err, err
    return err


@pytest.fixture
def plain_http_port() -> Iterator[int]:
    """A port that answers like a plain HTTP server (no TLS)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def answer() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def test_every_mistake_is_one_line_naming_what_is_wrong(server: Server, tmp_path: Path, plain_http_port: int) -> None:
    keys = server.pki
    usage = [
        (["start", "--pids", "-5", "--", "true"], "'--pids': -5 is not in the range"),
        (["start", "--io-read-iops", "/dev/null=-3", "--", "true"], "--io-read-iops: -3 is out of range"),
        (["stream", "--tail", "99999999999999999999999", "abcd"], "'--tail'"),
        (["--target", "", "list"], "want HOST:PORT"),
        (["--target", "127.0.0.1", "list"], "want HOST:PORT (e.g. 127.0.0.1:50051), got '127.0.0.1'"),
        (["get", "ab"], "at least 4 characters"),
        (["start", "-e", "A B=1", "--", "true"], "invalid environment variable name 'A B'"),
    ]
    for args, said in usage:
        assert said in one_line(jobctl(server, *args), code=2), args
    failed = [
        (["--client-key", str(keys.key("bob")), "list"], f"client key {keys.key('bob')} does not match"),
        (["--client-key", str(keys.ca), "list"], f"client key {keys.ca} holds no PEM private key"),
        (["--ca-cert", str(keys.key("alice")), "list"], f"CA certificate {keys.key('alice')} holds no PEM certificate"),
        (["--target", f"127.0.0.1:{plain_http_port}", "list"], f"127.0.0.1:{plain_http_port} does not speak TLS"),
    ]
    for args, said in failed:
        err = one_line(jobctl(server, *args))
        assert said in err, (args, err)
        assert "check the certificates" not in err
    # the output cannot be written: a full disk, or stdout closed
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([JOBCTL, "list"], env=server.env(), stdout=full, stderr=subprocess.PIPE)
    assert proc.returncode == 1 and proc.stderr == b"error: cannot write to stdout: No space left on device\n"
    closed = subprocess.run(
        [JOBCTL, "list"],
        env=server.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=(),
        preexec_fn=lambda: os.close(1),
    )
    assert closed.returncode == 1 and closed.stderr == b"error: cannot write to stdout: it is closed\n"
    # a number where the config file wants a string
    config = tmp_path / "jobctl" / "config.toml"
    config.parent.mkdir()
    config.write_text('current_context = "dev"\n[contexts.dev]\nclient_cert = 5\n')
    err = one_line(jobctl(server, "list", env={"XDG_CONFIG_HOME": str(tmp_path)}))
    assert f"{config}: context 'dev': client_cert must be a non-empty string, got 5" in err


def test_memory_above_the_hosts_is_refused(server: Server) -> None:
    err = one_line(jobctl(server, "start", "--memory", "100T", "--", "true"))
    assert "memory 100.0 TiB is more than this host's" in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_stream_resumes_across_a_server_restart(tmp_path: Path, keys: Pki) -> None:
    port = free_port()
    first = start_server(tmp_path, keys, "--listen", f"127.0.0.1:{port}")
    servers = [first]
    try:
        script = "i=0; while :; do i=$((i+1)); echo line-$i; sleep 0.05; done"
        job_id = ok(first, "start", "--", "sh", "-c", script).strip()
        watcher = subprocess.Popen(
            [JOBCTL, "stream", "--id", job_id], env=first.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert watcher.stdout is not None and watcher.stderr is not None
        assert watcher.stdout.readline() == b"line-1\n"
        first.proc.send_signal(signal.SIGKILL)  # a crash: the watcher's connection is cut
        first.proc.wait(30)
        first.stopped = True
        lost = watcher.stderr.readline().decode()
        assert "was lost" in lost and "reconnecting for up to 60s" in lost, lost
        second = start_server(tmp_path, keys, "--listen", f"127.0.0.1:{port}")  # same port, same state dir
        servers.append(second)
        out = watcher.stdout.read()
        err = lost + watcher.stderr.read().decode()
        assert watcher.wait(120) == 0, err
        assert "reconnected after" in err and "Traceback" not in err
        record = json.loads(ok(second, "get", "--id", job_id, "--json"))
        assert record["status"] == "stopped" and record["reason"] == "server restarted"
        complete = jobctl(second, "stream", "--id", job_id).stdout
        assert b"line-1\n" + out == complete  # every byte the server kept, once, in order
        lines = complete.splitlines()
        assert lines == [b"line-%d" % i for i in range(1, len(lines) + 1)]
    finally:
        for s in servers:
            if not s.stopped:
                s.stop()


def test_a_stream_gives_up_on_a_server_that_was_never_reached(server: Server) -> None:
    proc = jobctl(server, "--target", f"127.0.0.1:{free_port()}", "stream", "abcd")
    assert proc.returncode == 1 and proc.stderr.decode().startswith("error: cannot reach jobsvc")


def test_second_ctrl_c_on_run_waits_only_for_the_stop(server: Server) -> None:
    proc = subprocess.Popen(
        [JOBCTL, "run", "--grace", "2", "--", "sh", "-c", "trap '' TERM; echo up; exec sleep 1000"],
        env=server.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"up\n"
    proc.send_signal(signal.SIGINT)
    first = proc.stderr.readline().decode()
    assert first.startswith("jobctl: stopping job") and "Ctrl-C again" in first
    job_prefix = first.split()[3]
    proc.send_signal(signal.SIGINT)  # at once: the first Stop may not even have reached the server yet
    # as the README says: no more output, the stop is seen through (the job ignores SIGTERM, so SIGKILL after the
    # grace period), and jobctl exits with the job's code
    assert proc.wait(60) == 128 + signal.SIGKILL
    said = proc.stderr.read().decode()
    assert "no more output; waiting only for job" in said
    assert said.endswith(f"jobctl: job {job_prefix} was stopped: stopped by owner (SIGKILL)\n"), said
    record = json.loads(ok(server, "get", "--id", job_prefix, "--json"))
    assert record["status"] == "stopped" and record["signal"] == signal.SIGKILL


def test_run_says_why_the_job_was_killed(server: Server) -> None:
    oom = jobctl(server, "run", "--memory", "16M", "--", "python3", "-c", "x = bytearray(256 << 20)")
    assert oom.returncode == 128 + signal.SIGKILL
    assert oom.stderr.decode().splitlines()[-1].endswith("was killed at its memory limit (out of memory, SIGKILL)")
    late = jobctl(server, "run", "--timeout", "1s", "--", "sleep", "600")
    assert late.returncode == 128 + signal.SIGTERM
    assert late.stderr.decode().endswith("was stopped at its timeout of 1.0s (SIGTERM)\n")
    fine = jobctl(server, "run", "--", "sh", "-c", "exit 3")
    assert (fine.returncode, fine.stderr) == (3, b"")


def test_docker_and_nomad_habits(server: Server) -> None:
    running = ok(server, "start", "--", "sleep", "600").strip()
    done = ok(server, "start", "--", "true").strip()
    assert jobctl(server, "wait", done[:8]).returncode == 0
    assert running in ok(server, "get", running[:8])
    slow = jobctl(server, "wait", running[:8], "--timeout", "1s")
    assert slow.returncode == 124 and slow.stderr.decode() == f"jobctl: job {running[:8]} is still running after 1s\n"
    ids = [r["id"] for r in json.loads(ok(server, "list", "--json", "--status", "running", "--status", "finished"))]
    assert running in ids and done in ids
    assert running not in [r["id"] for r in json.loads(ok(server, "list", "--json", "--status", "finished"))]
    assert "stopped (SIGTERM)" in ok(server, "stop", running[:8], "--grace", "0")


def test_pki_add_user_to_a_running_servers_pki(server: Server) -> None:
    d = server.pki.dir
    added = subprocess.run([BIN / "jobsvc", "pki", "add-user", str(d), "erin"], capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    assert added.stdout.split() == [str(d / "erin.pem"), str(d / "erin-key.pem")]
    job_id = ok(server, "start", "--", "true").strip()
    as_erin = jobctl(server, "get", job_id, user="erin")  # erin is a user now, and sees only her own jobs
    assert as_erin.returncode == 1 and "no such job" in as_erin.stderr.decode()
    assert jobctl(server, "list", user="erin").returncode == 0
    before = (d / "erin.pem").read_bytes()
    again = subprocess.run([BIN / "jobsvc", "pki", "add-user", str(d), "erin"], capture_output=True, text=True)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    assert (d / "erin.pem").read_bytes() == before


def test_make_run_as_non_root_says_so_before_installing_anything() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="jobsvc-make-", dir="/var/tmp"))
    try:
        for name in ("Makefile", "pyproject.toml"):
            shutil.copy(REPO / name, scratch / name)
        os.chmod(scratch, 0o777)
        proc = subprocess.run(
            ["runuser", "-u", "nobody", "--", "make", "-C", str(scratch), "--no-print-directory", "run"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        said = (proc.stdout + proc.stderr).splitlines()
        assert proc.returncode != 0
        assert said[0].startswith("jobsvc serve must run as root"), said
        assert not (scratch / ".venv").exists()  # nothing was installed
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
