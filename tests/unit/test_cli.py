"""jobctl parsing and rendering with a fake JobClient (CliRunner; the real server is in tests/system)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from jobctl import render
from jobctl.client import ClientError, Output
from jobctl.main import cli

from jobsvc.model import IoLimit, JobRecord, Limits
from jobsvc.states import JobStatus

NOW = dt.datetime(2026, 11, 28, 12, 0, 0, tzinfo=dt.UTC)


def record(**kw: Any) -> JobRecord:
    base: dict[str, Any] = {
        "id": "6f1c1f9e-0000-4000-8000-000000000001",
        "owner": "CN=alice",
        "command": (b"sleep", b"10"),
        "status": JobStatus.RUNNING,
        "started_at": NOW - dt.timedelta(seconds=75),
        "pid": 99,
    }
    base.update(kw)
    return JobRecord(**base)


class FakeClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail: ClientError | None = None

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if self.fail:
            raise self.fail

    def start(
        self, argv: list[bytes], limits: Limits, env: Any = None, workdir: Any = None, timeout: Any = None
    ) -> JobRecord:
        self._record("start", argv, limits)
        self.start_options = {"env": env, "workdir": workdir, "timeout": timeout}
        return record(command=tuple(argv), limits=limits)

    def get(self, job_id: str) -> JobRecord:
        self._record("get", job_id)
        return record(id=job_id)

    def stop(self, job_id: str, grace: float | None, sig: int | None = None) -> JobRecord:
        self._record("stop", job_id, grace) if sig is None else self._record("stop", job_id, grace, sig)
        return record(id=job_id, status=JobStatus.STOPPED, signal=15, ended_at=NOW, reason="stopped by owner")

    def wait(self, job_id: str) -> JobRecord:
        self._record("wait", job_id)
        return record(id=job_id, status=JobStatus.FINISHED, exit_code=None, signal=9, ended_at=NOW)

    def list(self, status: Any = None, since: Any = None) -> list[JobRecord]:
        self._record("list") if status is None and since is None else self._record("list", status, since)
        return [
            record(),
            record(
                id="7a000000-0000-4000-8000-000000000002",
                status=JobStatus.FINISHED,
                exit_code=0,
                ended_at=NOW,
                output_bytes=3 << 20,
            ),
        ]

    def stream(
        self, job_id: str, from_offset: int = 0, follow: bool = True, only: Any = None, tail: Any = None
    ) -> Iterator[Output]:
        if (follow, only, tail) == (True, None, None):
            self._record("stream", job_id, from_offset)
        else:
            self._record("stream", job_id, from_offset, follow, only, tail)
        yield Output(1, 0, b"out\xff")
        yield Output(2, 4, b"err")

    def close(self) -> None:
        pass


@pytest.fixture
def fake() -> FakeClient:
    return FakeClient()


def invoke(fake: FakeClient, *args: str) -> Any:
    return CliRunner().invoke(cli, list(args), obj={"client_factory": lambda: fake})


def test_start_parses_limits_and_keeps_argv(fake: FakeClient) -> None:
    result = invoke(
        fake,
        "start",
        "--cpu",
        "0.5",
        "--memory",
        "64M",
        "--pids",
        "20",
        "--io-write-bps",
        "/dev/vda=1M",
        "--io-read-iops",
        "/dev/vda=50",
        "--io-read-bps",
        "8:16=2K",
        "--",
        "sh",
        "-c",
        "echo --memory",
    )
    assert result.exit_code == 0, result.output
    assert result.output == "6f1c1f9e-0000-4000-8000-000000000001\n"
    _, (argv, limits) = fake.calls[0]
    assert argv == [b"sh", b"-c", b"echo --memory"]
    assert limits == Limits(
        cpu=0.5,
        memory_bytes=64 << 20,
        pids=20,
        io=(IoLimit("8:16", read_bps=2048), IoLimit("/dev/vda", write_bps=1 << 20, read_iops=50)),
    )


@pytest.mark.parametrize(
    "args",
    [
        ["start"],
        ["start", "--memory", "x", "--", "true"],
        ["start", "--io-write-bps", "nodev", "--", "true"],
        ["start", "--io-write-iops", "/dev/vda=fast", "--", "true"],
        ["get"],
        ["stop", "--id", "x", "--grace", "-1"],
    ],
)
def test_usage_errors_exit_2(fake: FakeClient, args: list[str]) -> None:
    result = invoke(fake, *args)
    assert result.exit_code == 2
    assert fake.calls == []


def test_failed_operation_is_one_line_exit_1(fake: FakeClient) -> None:
    fake.fail = ClientError("no such job: abc")
    result = CliRunner().invoke(cli, ["get", "--id", "abc"], obj={"client_factory": lambda: fake})
    assert result.exit_code == 1
    assert result.output == "error: no such job: abc\n"


def test_get_json_is_the_engines_json(fake: FakeClient) -> None:
    result = invoke(fake, "get", "--id", "abcd", "--json")
    assert json.loads(result.output) == record(id="abcd").to_dict()


def test_list_table_and_json(fake: FakeClient) -> None:
    result = invoke(fake, "list")
    lines = result.output.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "STARTED", "DURATION", "OUTPUT", "COMMAND"]
    assert lines[1].startswith("6f1c1f9e  running")
    assert "finished (exit 0)" in lines[2] and "3.0 MiB" in lines[2]
    as_json = json.loads(invoke(fake, "list", "--json").output)
    assert [r["id"] for r in as_json] == [
        "6f1c1f9e-0000-4000-8000-000000000001",
        "7a000000-0000-4000-8000-000000000002",
    ]


def test_stream_splits_stdout_and_stderr(fake: FakeClient) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["stream", "--id", "abcd", "--from-offset", "7"], obj={"client_factory": lambda: fake})
    assert result.exit_code == 0
    assert result.stdout_bytes == b"out\xff"
    assert result.stderr_bytes == b"err"
    assert fake.calls == [("stream", ("abcd", 7))]


def test_wait_exits_128_plus_signal(fake: FakeClient) -> None:
    assert invoke(fake, "wait", "--id", "abcd").exit_code == 137


def test_stop_passes_grace(fake: FakeClient) -> None:
    result = invoke(fake, "stop", "--id", "abcd", "--grace", "2.5")
    assert result.exit_code == 0 and "stopped (SIGTERM)" in result.output
    assert fake.calls == [("stop", ("abcd", 2.5))]


def test_render_humanises() -> None:
    assert render.size(0) == "0 B" and render.size(1536) == "1.5 KiB" and render.size(5 << 30) == "5.0 GiB"
    assert render.duration(0.25) == "250ms" and render.duration(75) == "1m15s" and render.duration(7300) == "2h01m"
    text = render.record_text(
        record(
            status=JobStatus.FINISHED,
            signal=9,
            oom_killed=True,
            reason="oom",
            ended_at=NOW,
            limits=Limits(memory_bytes=64 << 20),
        ),
        now=NOW,
    )
    assert "finished (SIGKILL, out of memory)" in text
    assert "oom killed:" in text and "memory 64.0 MiB" in text


def test_start_env_workdir_timeout(fake: FakeClient, tmp_path: Any) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("# a comment\nA=from-file\n\nB=2\n")
    result = invoke(
        fake,
        "start",
        "--env-file",
        str(env_file),
        "-e",
        "A=override",
        "--env",
        "C=x=y",
        "--workdir",
        "/srv",
        "--timeout",
        "5m",
        "--",
        "true",
    )
    assert result.exit_code == 0, result.output
    assert fake.start_options == {
        "env": {"A": b"override", "B": b"2", "C": b"x=y"},
        "workdir": "/srv",
        "timeout": 300.0,
    }


@pytest.mark.parametrize(
    "args",
    [
        ["start", "-e", "NOVALUE", "--", "true"],
        ["start", "--timeout", "soon", "--", "x"],
        ["start", "--env-file", "/no/such/file", "--", "true"],
        ["stop", "--id", "x", "--signal", "BOGUS"],
        ["stream", "--id", "x", "--stdout", "--stderr"],
        ["list", "--status", "sleeping"],
        ["list", "--since", "yesterday"],
    ],
)
def test_everyday_usage_errors(fake: FakeClient, args: list[str]) -> None:
    assert invoke(fake, *args).exit_code == 2
    assert fake.calls == []


def test_stop_signal_list_filters_stream_options(fake: FakeClient) -> None:
    assert invoke(fake, "stop", "--id", "abcd", "--signal", "int").exit_code == 0
    assert invoke(fake, "stop", "--id", "abcd", "--signal", "9").exit_code == 0
    assert invoke(fake, "list", "--status", "running", "--since", "10m").exit_code == 0
    assert invoke(fake, "stream", "--id", "abcd", "--stderr", "--no-follow", "--tail", "3").exit_code == 0
    assert fake.calls == [
        ("stop", ("abcd", None, 2)),
        ("stop", ("abcd", None, 9)),
        ("list", ("running", 600.0)),
        ("stream", ("abcd", 0, False, 2, 3)),
    ]
