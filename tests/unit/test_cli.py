"""jobctl parsing and rendering with a fake JobClient (CliRunner; the real server is in tests/system)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
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
    assert fake.calls[-1:] == [("list", ((), seconds))]
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


# -- issue 18.4: one settings resolver: flag > JOBCTL_* variable > context > default, in every path ---------------

SETTING_VARS = {
    "target": "JOBCTL_TARGET",
    "ca_cert": "JOBCTL_CA_CERT",
    "client_cert": "JOBCTL_CLIENT_CERT",
    "client_key": "JOBCTL_CLIENT_KEY",
    "timeout": "JOBCTL_TIMEOUT",
}
DEFAULTS: dict[str, Any] = {
    "target": "127.0.0.1:50051",
    "ca_cert": Path(".jobsvc/pki/ca.pem"),
    "client_cert": Path(".jobsvc/pki/alice.pem"),
    "client_key": Path(".jobsvc/pki/alice-key.pem"),
    "timeout": 10.0,
}
CONFIG = """current_context = "a"
[contexts.a]
target = "127.0.0.1:1001"
ca_cert = "~/a/ca.pem"
client_cert = "~/a/me.pem"
client_key = "~/a/me-key.pem"
timeout = 3
[contexts.b]
target = "127.0.0.1:1002"
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home with CONFIG as jobctl's config and no JOBCTL_* variable set."""
    for var in [*SETTING_VARS.values(), "JOBCTL_CONTEXT"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / ".config"))
    (tmp_path / ".config" / "jobctl").mkdir(parents=True)
    (tmp_path / ".config" / "jobctl" / "config.toml").write_text(CONFIG)
    return tmp_path


class RecordingClient:
    """Stands in for jobctl.client.JobClient: records the settings each client was made with."""

    made: list[dict[str, Any]]

    def __init__(
        self, target: str, ca_cert: Path, client_cert: Path, client_key: Path, timeout: float | None = 10.0
    ) -> None:
        self.settings: dict[str, Any] = {
            "target": target,
            "ca_cert": ca_cert,
            "client_cert": client_cert,
            "client_key": client_key,
            "timeout": timeout,
        }
        self.made.append(self.settings)

    def __enter__(self) -> RecordingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def list(self, status: Any = (), since: Any = None, limit: Any = None) -> list[JobRecord]:
        n = int(self.settings["target"].rpartition(":")[2]) % 1000  # which server answers: 1001 -> 1, 1002 -> 2
        return [record(id=f"{n}{n}{n}{n}0000-0000-4000-8000-000000000001", started_at=NOW - dt.timedelta(seconds=n))]


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The settings of every JobClient jobctl makes (none reaches a server)."""
    from jobctl import client as client_module

    clients: list[dict[str, Any]] = []
    monkeypatch.setattr(RecordingClient, "made", clients, raising=False)
    monkeypatch.setattr(client_module, "JobClient", RecordingClient)
    return clients


def _levels(home: Path, key: str) -> dict[str, tuple[list[str], dict[str, str], Any]]:
    """For each level the setting can come from: (flags, variables, the value it must resolve to)."""
    flag = {"target": "127.0.0.1:7001", "timeout": "1s"}.get(key, f"/flag/{key}.pem")
    var = {"target": "127.0.0.1:7002", "timeout": "2s"}.get(key, f"/var/{key}.pem")
    want_flag: Any = {"target": flag, "timeout": 1.0}.get(key, Path(flag))
    want_var: Any = {"target": var, "timeout": 2.0}.get(key, Path(var))
    from_context: Any = {"target": "127.0.0.1:1001", "timeout": 3.0}.get(key)
    if from_context is None:
        from_context = home / "a" / {"ca_cert": "ca.pem", "client_cert": "me.pem", "client_key": "me-key.pem"}[key]
    option = "--" + key.replace("_", "-")
    return {
        "flag": ([option, flag], {SETTING_VARS[key]: var}, want_flag),
        "variable": ([], {SETTING_VARS[key]: var}, want_var),
        "context": ([], {}, from_context),  # ~ in the config is the user's home
        "default": (["--context", "b"], {}, DEFAULTS[key]),  # b does not set it (its target is b's own)
    }


@pytest.mark.parametrize("level", ["flag", "variable", "context", "default"])
@pytest.mark.parametrize("key", list(SETTING_VARS))
def test_a_command_takes_each_setting_from_flag_then_variable_then_context_then_default(
    fake: FakeClient, home: Path, key: str, level: str
) -> None:
    flags, env, want = _levels(home, key)[level]
    if level == "default" and key == "target":
        want = "127.0.0.1:1002"
    obj: dict[str, Any] = {"client_factory": lambda: fake}
    result = CliRunner(env=env).invoke(cli, [*flags, "list"], obj=obj)
    assert result.exit_code == 0, (result.output, result.exception)
    assert obj[key] == want


@pytest.mark.parametrize("level", ["flag", "variable", "context"])
@pytest.mark.parametrize("key", list(SETTING_VARS))
def test_all_contexts_resolves_each_context_alike_and_flags_still_win(
    made: list[dict[str, Any]], home: Path, key: str, level: str
) -> None:
    flags, env, want = _levels(home, key)[level]
    result = CliRunner(env=env).invoke(cli, [*flags, "list", "--all-contexts", "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    by_target = {m["target"]: m for m in made}
    if level in ("flag", "variable"):
        assert [m[key] for m in made] == [want, want]  # the user's setting wins on every context
        if key != "target":
            assert set(by_target) == {"127.0.0.1:1001", "127.0.0.1:1002"}
        return
    a, b = by_target["127.0.0.1:1001"], by_target["127.0.0.1:1002"]
    assert a[key] == (want if key != "target" else "127.0.0.1:1001")
    # b sets only its target: the rest are the defaults, not the values of a, the selected context
    assert b[key] == ("127.0.0.1:1002" if key == "target" else DEFAULTS[key])
    assert [r["context"] for r in json.loads(result.stdout)] == ["b", "a"]  # oldest first: b's job started later


def test_all_contexts_ca_cert_flag_is_used_for_every_context(made: list[dict[str, Any]], home: Path) -> None:
    # issue 18: --ca-cert was ignored with --all-contexts, and the error then told the user to set --ca-cert
    result = CliRunner().invoke(cli, ["--ca-cert", "/mine/ca.pem", "list", "--all-contexts"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert sorted((m["target"], m["ca_cert"]) for m in made) == [
        ("127.0.0.1:1001", Path("/mine/ca.pem")),
        ("127.0.0.1:1002", Path("/mine/ca.pem")),
    ]


def _complete(args: list[str], incomplete: str = "") -> list[str]:
    from click.shell_completion import ShellComplete

    return [
        item.value for item in ShellComplete(cli, {}, "jobctl", "_JOBCTL_COMPLETE").get_completions(args, incomplete)
    ]


@pytest.mark.parametrize(
    ("args", "env", "target", "ca_cert"),
    [
        (["get"], {}, "127.0.0.1:1001", "a/ca.pem"),  # the current context
        (["--context", "b", "get"], {}, "127.0.0.1:1002", ".jobsvc/pki/ca.pem"),
        (["stream", "--id"], {"JOBCTL_CONTEXT": "b"}, "127.0.0.1:1002", ".jobsvc/pki/ca.pem"),
        (["--ca-cert", "/mine/ca.pem", "wait"], {}, "127.0.0.1:1001", "/mine/ca.pem"),
        (["stop"], {"JOBCTL_TARGET": "127.0.0.1:7002"}, "127.0.0.1:7002", "a/ca.pem"),
        (["--target", "127.0.0.1:7001", "get"], {"JOBCTL_TARGET": "127.0.0.1:7002"}, "127.0.0.1:7001", "a/ca.pem"),
    ],
)
def test_completion_of_ids_asks_the_selected_contexts_server_with_its_certificates(
    made: list[dict[str, Any]],
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    target: str,
    ca_cert: str,
) -> None:
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    ids = _complete(args)
    assert len(made) == 1
    assert made[0]["target"] == target
    assert made[0]["ca_cert"] == (home / ca_cert if ca_cert.startswith("a/") else Path(ca_cert))
    n = int(target.rpartition(":")[2]) % 1000
    assert ids == [f"{n}{n}{n}{n}0000-0000-4000-8000-000000000001"]
    assert _complete(args, "9") == []  # only the ids that begin with what is typed


def test_completion_is_quiet_when_the_config_is_broken(made: list[dict[str, Any]], home: Path) -> None:
    (home / ".config" / "jobctl" / "config.toml").write_text('current_context = "gone"\n')
    assert _complete(["get"]) == []
    assert made == []
