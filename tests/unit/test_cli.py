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

    def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        self._record("wait", job_id) if timeout is None else self._record("wait", job_id, timeout)
        return record(id=job_id, status=JobStatus.FINISHED, exit_code=None, signal=9, ended_at=NOW)

    def list(self, status: Any = (), since: Any = None, limit: Any = None) -> list[JobRecord]:
        if limit is not None:
            self._record("list", status, since, limit)
        else:
            self._record("list") if not status and since is None else self._record("list", status, since)
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
        self,
        job_id: str,
        from_offset: int = 0,
        follow: bool = True,
        only: Any = None,
        tail: Any = None,
        since_ms: Any = None,
    ) -> Iterator[Output]:
        if (follow, only, tail, since_ms) == (True, None, None, None):
            self._record("stream", job_id, from_offset)
        elif since_ms is None:
            self._record("stream", job_id, from_offset, follow, only, tail)
        else:
            self._record("stream", job_id, from_offset, follow, only, tail, since_ms)
        yield Output(1, 0, b"out\xff\nsecond line\n", 1_796_120_683_089)
        yield Output(2, 17, b"err", 1_796_120_683_189)

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
    fake.fail = ClientError("no such job: abcd")
    result = CliRunner().invoke(cli, ["get", "--id", "abcd"], obj={"client_factory": lambda: fake})
    assert result.exit_code == 1
    assert result.output == "error: no such job: abcd\n"


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
    assert result.stdout_bytes == b"out\xff\nsecond line\n"
    assert result.stderr_bytes == b"err"
    assert fake.calls == [("stream", ("abcd", 7))]


def test_stream_timestamps_begin_every_line_with_the_time_the_server_read_it(fake: FakeClient) -> None:
    result = CliRunner().invoke(cli, ["stream", "abcd", "-t"], obj={"client_factory": lambda: fake})
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == (
        b"2026-12-01T10:24:43.089Z out\xff\n2026-12-01T10:24:43.089Z second line\n"
    )  # binary output stays as it was, only prefixed
    assert result.stderr_bytes == b"2026-12-01T10:24:43.189Z err"


def test_stream_since_takes_a_duration_or_a_time_and_sends_unix_ms(fake: FakeClient) -> None:
    import time

    before = time.time()
    assert invoke(fake, "stream", "abcd", "--since", "10m").exit_code == 0
    assert invoke(fake, "stream", "abcd", "--since", "2026-12-01T10:00:00Z").exit_code == 0
    (_, first), (_, second) = fake.calls
    assert first[:5] == second[:5] == ("abcd", 0, True, None, None)
    assert abs(first[5] - (before - 600) * 1000) < 5000  # ten minutes before now, in Unix ms
    assert second[5] == 1_796_119_200_000
    bad = invoke(fake, "stream", "abcd", "--since", "2026-12-01T10:00:00")
    assert bad.exit_code == 2 and "no time zone" in bad.output
    assert invoke(fake, "stream", "abcd", "--since", "soon").exit_code == 2


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
        ("list", (("running",), 600.0)),
        ("stream", ("abcd", 0, False, 2, 3)),
    ]


# -- issue 17: edges -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["start", "--pids", "-5", "--", "true"], "--pids"),
        (["start", "--pids", "99999999999999999999", "--", "true"], "--pids"),
        (["start", "--io-read-iops", "/dev/vda=-3", "--", "true"], "--io-read-iops"),
        (["start", "--io-write-iops", "/dev/vda=99999999999999999999", "--", "true"], "--io-write-iops"),
        (["stream", "abcd", "--from-offset", "99999999999999999999"], "--from-offset"),
        (["stream", "abcd", "--tail", "99999999999999999999"], "--tail"),
        (["stop", "abcd", "--signal", "99999999999"], "--signal"),
        (["stop", "abcd", "--grace", "nan"], "--grace"),
        (["stop", "abcd", "--grace", "2h"], "--grace"),
        (["--timeout", "1e400", "list"], "--timeout"),
        (["--target", "", "list"], "--target"),
        (["--target", "localhost", "list"], "--target"),
        (["--target", "127.0.0.1:99999", "list"], "--target"),
        (["start", "-e", "A B=1", "--", "true"], "--env"),
        (["start", "-e", "=x", "--", "true"], "--env"),
        (["start", "-e", "C", "--", "true"], "--env"),
        (["get", "ab"], "ID"),
        (["get", "abcd", "--id", "efgh"], "two job ids"),
        (["get"], "missing job id"),
        (["wait", "abcd", "--timeout", "soon"], "--timeout"),
    ],
)
def test_mistakes_are_usage_errors_without_traceback(fake: FakeClient, args: list[str], named: str) -> None:
    result = invoke(fake, *args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # not a ValueError from protobuf or a TypeError
    assert result.output.startswith("Usage: ") and "Error: " in result.output
    assert named in result.output.splitlines()[-1]
    assert fake.calls == []


def test_env_file_export_line_is_refused(fake: FakeClient, tmp_path: Any) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("export C=1\n")
    result = invoke(fake, "start", "--env-file", str(env_file), "--", "true")
    assert result.exit_code == 2 and "drop the 'export'" in result.output and fake.calls == []


def test_ids_as_argument_or_option(fake: FakeClient) -> None:
    for command in ("get", "stop", "stream", "wait"):
        assert invoke(fake, command, "16c928c8").exit_code in (0, 137), command
        assert invoke(fake, command, "--id", "16c928c8").exit_code in (0, 137), command
    assert invoke(fake, "get", "16c928c8", "--id", "16c928c8").exit_code == 0
    assert [c for c, _ in fake.calls] == ["get", "get", "stop", "stop", "stream", "stream", "wait", "wait", "get"]
    assert {args[0] for _, args in fake.calls} == {"16c928c8"}


def test_list_status_is_repeatable(fake: FakeClient) -> None:
    assert invoke(fake, "list", "--status", "running", "--status", "stopped", "--status", "running").exit_code == 0
    assert fake.calls == [("list", (("running", "stopped"), None))]


@pytest.mark.parametrize(("text", "seconds"), [("90", 90.0), ("90s", 90.0), ("1m30s", 90.0), ("2m", 120.0)])
def test_every_duration_option_reads_durations_alike(fake: FakeClient, text: str, seconds: float) -> None:
    assert invoke(fake, "start", "--timeout", text, "--", "true").exit_code == 0
    assert fake.start_options["timeout"] == seconds
    assert invoke(fake, "stop", "abcd", "--grace", text).exit_code == 0
    assert fake.calls[-1] == ("stop", ("abcd", seconds))
    assert invoke(fake, "wait", "abcd", "--timeout", text).exit_code == 137
    assert fake.calls[-1] == ("wait", ("abcd", seconds))
    assert invoke(fake, "list", "--since", text).exit_code == 0
    assert fake.calls[-1] == ("list", ((), seconds))
    obj: dict[str, Any] = {"client_factory": lambda: fake}
    assert CliRunner().invoke(cli, ["--timeout", text, "list"], obj=obj).exit_code == 0
    assert obj["timeout"] == seconds


def test_wait_timeout_exits_124_and_says_so(fake: FakeClient) -> None:
    from jobctl.client import WaitTimeoutError

    def wait(job_id: str, timeout: float | None = None) -> JobRecord:
        raise WaitTimeoutError(f"job {job_id} is still running after {timeout:g}s")

    fake.wait = wait  # type: ignore[method-assign]
    result = invoke(fake, "wait", "abcd", "--timeout", "2s")
    assert result.exit_code == 124
    assert result.stderr == "jobctl: job abcd is still running after 2s\n"


@pytest.mark.parametrize(
    ("final", "line"),
    [
        (
            {"status": JobStatus.FINISHED, "signal": 9, "oom_killed": True, "reason": "oom"},
            "jobctl: job 6f1c1f9e was killed at its memory limit (out of memory, SIGKILL)\n",
        ),
        (
            {"status": JobStatus.STOPPED, "signal": 15, "reason": "timeout", "timeout_seconds": 2.0},
            "jobctl: job 6f1c1f9e was stopped at its timeout of 2.0s (SIGTERM)\n",
        ),
        (
            {"status": JobStatus.STOPPED, "signal": 15, "reason": "stopped by owner"},
            "jobctl: job 6f1c1f9e was stopped: stopped by owner (SIGTERM)\n",
        ),
        (
            {"status": JobStatus.STOPPED, "signal": 9, "reason": "server restarted"},
            "jobctl: job 6f1c1f9e was stopped: server restarted (SIGKILL)\n",
        ),
        ({"status": JobStatus.FINISHED, "signal": 11}, "jobctl: job 6f1c1f9e was killed by SIGSEGV\n"),
        ({"status": JobStatus.FINISHED, "exit_code": 3}, ""),
    ],
)
def test_run_says_why_the_job_ended(fake: FakeClient, final: dict[str, Any], line: str) -> None:
    fake.wait = lambda job_id, timeout=None: record(ended_at=NOW, **final)  # type: ignore[method-assign]
    result = invoke(fake, "run", "--", "true")
    assert result.stderr == "err" + line  # the job's own stderr, then jobctl's line


def test_config_with_a_number_where_a_string_belongs(fake: FakeClient, tmp_path: Any) -> None:
    (tmp_path / "jobctl").mkdir()
    config = tmp_path / "jobctl" / "config.toml"
    for body, named in [
        ('current_context = "dev"\n[contexts.dev]\ntarget = 50051\n', "target must be a non-empty string, got 50051"),
        ('current_context = "dev"\n[contexts.dev]\nca_cert = 1\n', "ca_cert must be a non-empty string, got 1"),
        ('current_context = "dev"\n[contexts.dev]\ntimeout = "soon"\n', "timeout: cannot parse 'soon'"),
        ('current_context = "dev"\n[contexts.dev]\ntarget = "nohost"\n', "target: want HOST:PORT"),
        ("current_context = 3\n", "current_context must be a string"),
    ]:
        config.write_text(body)
        result = CliRunner(env={"XDG_CONFIG_HOME": str(tmp_path)}).invoke(
            cli, ["list"], obj={"client_factory": lambda: fake}
        )
        assert result.exit_code == 1, (body, result.output, result.exception)
        assert result.output.count("\n") == 1 and str(config) in result.output and named in result.output
    config.write_text('current_context = "dev"\n[contexts.dev]\ntimeout = 30\ntarget = "127.0.0.1:5"\n')
    obj: dict[str, Any] = {"client_factory": lambda: fake}
    assert CliRunner(env={"XDG_CONFIG_HOME": str(tmp_path)}).invoke(cli, ["list"], obj=obj).exit_code == 0
    assert obj["timeout"] == 30.0 and obj["target"] == "127.0.0.1:5"


def _commands() -> list[tuple[str, ...]]:
    names: list[tuple[str, ...]] = [()]
    for name, command in cli.commands.items():
        names.append((name,))
        names += [(name, sub) for sub in getattr(command, "commands", {})]
    return names


@pytest.mark.parametrize("path", _commands())
def test_help_is_complete_and_consistent(path: tuple[str, ...]) -> None:
    import click

    command: Any = cli
    for name in path:
        command = command.commands[name]
    ctx = click.Context(command, info_name="jobctl")
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden or param.name == "help":
            continue
        assert param.help, f"{' '.join(path)} {param.opts[0]} has no help"
        if param.multiple:
            assert "Repeatable" in param.help, f"{param.opts[0]} is repeatable but its help does not say so"
        if param.envvar:
            assert param.show_envvar, f"{param.opts[0]} reads {param.envvar} but --help does not show it"
        if param.metavar == "DURATION":
            assert type(param.type).__name__ == "Duration", f"{param.opts[0]} does not read durations like the rest"
    text = command.get_help(ctx)
    if path == ("list",):
        assert "JSON array" in text
    if path == ():
        assert "env var:" in text and "JOBCTL_TARGET" in text and "JOBCTL_TIMEOUT" in text
    if path in (("get",), ("stop",), ("stream",), ("wait",)):
        assert "ID" in text.splitlines()[0]


def test_client_constants_match_the_engine() -> None:
    from jobctl import main

    from jobsvc import limits, manager

    assert main.MIN_PREFIX == manager.MIN_PREFIX
    assert main.MAX_PIDS == limits.MAX_PIDS


def test_an_end_no_server_saw_says_so_rather_than_exit_none() -> None:
    restarted = record(status=JobStatus.STOPPED, reason="server restarted", ended_at=NOW, exit_code=None, signal=None)
    assert render.outcome(restarted) == "stopped (exit status unknown)"
    assert "None" not in render.record_text(restarted, NOW) and "None" not in render.table([restarted], NOW)
    assert render.outcome(record(status=JobStatus.FINISHED, ended_at=NOW, exit_code=0)) == "finished (exit 0)"
    assert render.outcome(record(status=JobStatus.STOPPED, ended_at=NOW, signal=15)) == "stopped (SIGTERM)"
