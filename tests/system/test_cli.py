"""The installed jobctl as a subprocess against a real server: every command and every exit code.

Every test runs both ways: through jobctl's warm command server (the default) and in-process (JOBCTL_NO_AGENT=1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.conftest import processes_in_cgroup_named, start_agent
from tests.system.server import BIN, Server, bound

JOBCTL = str(BIN / "jobctl")


@pytest.fixture(params=["agent", "in-process"], autouse=True)
def way(request: pytest.FixtureRequest, jobctl_runtime_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "in-process":
        monkeypatch.setenv("JOBCTL_NO_AGENT", "1")
        yield request.param
        assert not list(jobctl_runtime_dir.glob("jobctl/agent-*")), "JOBCTL_NO_AGENT=1 started an agent"
        return
    agent = start_agent(jobctl_runtime_dir)
    yield request.param
    assert agent.stop() > 0, "no command went through the agent"


def jobctl(server: Server, *args: str, user: str = "alice", timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([JOBCTL, *args], env=server.env(user), capture_output=True, timeout=bound(timeout))


def ok(server: Server, *args: str) -> str:
    proc = jobctl(server, *args)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def assert_one_line_error(proc: subprocess.CompletedProcess[bytes], code: int = 1) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err
    if code == 1:
        assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_start_prints_the_id_alone_and_get_list_show_it(server: Server) -> None:
    out = ok(server, "start", "--", "sh", "-c", "echo hello; exit 4")
    job_id = out.strip()
    assert out == job_id + "\n" and len(job_id) == 36
    assert jobctl(server, "wait", "--id", job_id).returncode == 4
    text = ok(server, "get", "--id", job_id[:8])
    assert "id:" in text and job_id in text and "finished (exit 4)" in text
    record = json.loads(ok(server, "get", "--id", job_id, "--json"))
    assert record["id"] == job_id and record["status"] == "finished" and record["exit_code"] == 4
    assert record["command"] == ["sh", "-c", "echo hello; exit 4"] and record["owner"] == "CN=alice"
    assert set(record) >= {
        "id",
        "owner",
        "command",
        "status",
        "reason",
        "exit_code",
        "signal",
        "oom_killed",
        "started_at",
        "ended_at",
        "limits",
    }
    assert record["started_at"].endswith("Z") and record["ended_at"].endswith("Z")
    table = ok(server, "list")
    header, *rows = table.splitlines()
    assert header.split() == ["ID", "STATUS", "STARTED", "DURATION", "OUTPUT", "COMMAND"]
    assert any(row.startswith(job_id[:8]) and "finished (exit 4)" in row for row in rows)
    listed = json.loads(ok(server, "list", "--json"))
    assert isinstance(listed, list) and job_id in [r["id"] for r in listed]
    assert next(r for r in listed if r["id"] == job_id) == record
    started = json.loads(ok(server, "start", "--json", "--", "true"))
    assert started["status"] == "running" and started["command"] == ["true"]


def test_stream_writes_stdout_and_stderr_unchanged(server: Server) -> None:
    job_id = ok(server, "start", "--", "sh", "-c", "printf 'a\\000b\\377'; echo err >&2; echo more").strip()
    proc = jobctl(server, "stream", "--id", job_id)
    assert proc.returncode == 0
    assert proc.stdout == b"a\x00b\xffmore\n"
    assert proc.stderr == b"err\n"
    skipped = jobctl(server, "stream", "--id", job_id, "--from-offset", "2")
    assert skipped.stdout == b"b\xffmore\n"


def test_wait_and_run_exit_with_the_jobs_code(server: Server) -> None:
    job_id = ok(server, "start", "--", "sh", "-c", "exit 9").strip()
    assert jobctl(server, "wait", "--id", job_id).returncode == 9
    killed = ok(server, "start", "--", "sh", "-c", "kill -KILL $$").strip()
    assert jobctl(server, "wait", "--id", killed).returncode == 128 + 9
    run = jobctl(server, "run", "--", "sh", "-c", "echo from-run; echo to-err >&2; exit 3")
    assert (run.returncode, run.stdout, run.stderr) == (3, b"from-run\n", b"to-err\n")
    assert jobctl(server, "run", "--memory", "64M", "--", "true").returncode == 0


def test_stop_stops_the_job(server: Server) -> None:
    job_id = ok(server, "start", "--", "sleep", "1000").strip()
    out = ok(server, "stop", "--id", job_id, "--grace", "1")
    assert "stopped (SIGTERM)" in out
    assert json.loads(ok(server, "get", "--id", job_id, "--json"))["reason"] == "stopped by owner"
    assert processes_in_cgroup_named(job_id) == []


def test_ctrl_c_on_stream_leaves_the_job_running(server: Server) -> None:
    job_id = ok(server, "start", "--", "sh", "-c", "echo tick; sleep 1000").strip()
    proc = subprocess.Popen(
        [JOBCTL, "stream", "--id", job_id], env=server.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"tick\n"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 130
    assert b"Traceback" not in proc.stderr.read()  # type: ignore[union-attr]
    assert json.loads(ok(server, "get", "--id", job_id, "--json"))["status"] == "running"
    ok(server, "stop", "--id", job_id, "--grace", "0")


def test_ctrl_c_on_run_stops_the_job(server: Server) -> None:
    proc = subprocess.Popen(
        [JOBCTL, "run", "--grace", "1", "--", "sh", "-c", "echo up; exec sleep 1000"],
        env=server.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 128 + signal.SIGTERM
    jobs = json.loads(ok(server, "list", "--json"))
    mine = [j for j in jobs if j["command"] == ["sh", "-c", "echo up; exec sleep 1000"]]
    assert mine and mine[-1]["status"] == "stopped"


def test_failed_operations_print_one_line_and_exit_1(server: Server, tmp_path: object) -> None:
    err = assert_one_line_error(jobctl(server, "get", "--id", "00000000-0000-4000-8000-000000000000"))
    assert "no such job" in err
    assert "No such file" in assert_one_line_error(jobctl(server, "start", "--", "/no/such/thing"))
    assert "memory" in assert_one_line_error(jobctl(server, "start", "--memory", "1K", "--", "true"))
    wrong_target = jobctl(server, "--target", "127.0.0.1:1", "list")
    assert "cannot reach jobsvc at 127.0.0.1:1" in assert_one_line_error(wrong_target)
    missing = subprocess.run(
        [JOBCTL, "--client-cert", "/nonexistent.pem", "list"],
        env=server.env(),
        capture_output=True,
        timeout=30,
    )
    assert "/nonexistent.pem" in assert_one_line_error(missing)
    impostor = {
        **server.env(),
        "JOBCTL_CLIENT_CERT": str(server.pki.cert("mallory")),
        "JOBCTL_CLIENT_KEY": str(server.pki.key("mallory")),
    }
    refused = subprocess.run([JOBCTL, "list"], env=impostor, capture_output=True, timeout=30)
    assert_one_line_error(refused)


@pytest.mark.parametrize(
    "args",
    [
        ["nosuchcommand"],
        ["get"],
        ["start"],
        ["start", "--memory", "lots", "--", "true"],
        ["start", "--cpu", "x", "--", "true"],
        ["start", "--io-read-bps", "nodevice", "--", "true"],
        ["stream", "--id", "x", "--from-offset", "-1"],
        ["stop", "--id", "x", "--grace", "-5"],
        ["--timeout", "0", "list"],
    ],
)
def test_usage_errors_exit_2_without_traceback(server: Server, args: list[str]) -> None:
    err = assert_one_line_error(jobctl(server, *args), code=2)
    assert "Error:" in err or "Usage:" in err


def test_completion_script_is_available() -> None:
    proc = subprocess.run(
        [JOBCTL], env={**os.environ, "_JOBCTL_COMPLETE": "bash_source"}, capture_output=True, timeout=30
    )
    assert proc.returncode == 0 and b"complete" in proc.stdout


def test_prefix_ids_work_in_every_command(server: Server) -> None:
    job_id = ok(server, "start", "--", "sh", "-c", "echo pfx; sleep 0.3").strip()
    prefix = job_id[:6]
    assert jobctl(server, "stream", "--id", prefix).stdout == b"pfx\n"
    assert jobctl(server, "wait", "--id", prefix).returncode == 0
    assert json.loads(ok(server, "get", "--json", "--id", prefix))["id"] == job_id
    started = time.monotonic()
    ok(server, "stop", "--id", prefix)
    assert time.monotonic() - started < 60
