"""One vocabulary for limits on both command lines: jobsvc serve and jobctl read values with jobsvc.params."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from jobctl import client as jobctl_client
from jobctl import main as jobctl_main

from jobsvc import cmd, params
from jobsvc.model import IoLimit, Limits
from jobsvc.server import app


def serve_options() -> dict[str, click.Parameter]:
    return {p.opts[0]: p for p in cmd.serve.params if p.opts}


def job_options() -> dict[str, click.Parameter]:
    command = jobctl_main.cli.commands["start"]
    return {p.opts[0]: p for p in command.params if p.opts}


def test_both_command_lines_read_limits_with_the_same_types() -> None:
    serve, start = serve_options(), job_options()
    for flag in ("--default-cpu", "--max-cpu"):
        assert isinstance(serve[flag].type, params.Cpu)
    assert isinstance(start["--cpu"].type, params.Cpu)
    for flag in ("--default-memory", "--max-memory", "--max-output", "--max-argv-bytes"):
        assert isinstance(serve[flag].type, params.Size)
    assert isinstance(start["--memory"].type, params.Size)
    for flag in ("--default-timeout", "--keep-finished-for", "--keepalive-time"):
        assert isinstance(serve[flag].type, params.Duration)
    assert isinstance(start["--timeout"].type, params.Duration)
    for flag in ("--io-read-bps", "--io-write-bps", "--io-read-iops", "--io-write-iops"):
        assert isinstance(start[flag].type, params.DeviceValue)


@pytest.mark.parametrize(
    ("param", "text", "value"),
    [
        (params.Size(), "64M", 64 << 20),
        (params.Size(), "1.5G", 3 << 29),
        (params.Cpu(), "0.25", 0.25),
        (params.Duration(), "1m30s", 90.0),
        (params.Duration(allow_zero=True), "0", 0.0),
        (params.DeviceValue("--io-read-bps", rate=True), "/dev/vda=1M", ("/dev/vda", 1 << 20)),
        (params.DeviceValue("--io-read-iops", rate=False), "8:0=50", ("8:0", 50)),
    ],
)
def test_values_read_as_the_engine_reads_them(param: params.LimitParam, text: str, value: object) -> None:
    assert param.convert(text, None, None) == value


def test_jobctl_start_reads_every_limit() -> None:
    seen: list[Limits] = []

    class Client:
        def close(self) -> None:
            pass

        def start(self, argv: list[bytes], limits: Limits, **kw: object) -> object:
            seen.append(limits)
            raise SystemExit(0)

    args = ["start", "--cpu", "0.5", "--memory", "1G", "--pids", "9", "--io-read-bps", "8:0=2K"]
    args += ["--io-write-iops", "8:0=7", "--io-write-bps", "/dev/vda=1M", "--", "true"]
    result = CliRunner().invoke(jobctl_main.cli, args, obj={"client_factory": Client})
    assert result.exit_code == 0, result.output
    assert seen == [
        Limits(
            cpu=0.5,
            memory_bytes=1 << 30,
            pids=9,
            io=(IoLimit("8:0", read_bps=2048, write_iops=7), IoLimit("/dev/vda", write_bps=1 << 20)),
        )
    ]


# Each command line's wording of a bad value, as it was before the vocabulary was shared.
JOBCTL_SAYS = [
    (["--cpu", "x"], "Invalid value for --cpu: cpu: cannot parse 'x' (want CPUs as a decimal, e.g. 0.5)"),
    (["--memory", "x"], "Invalid value: --memory: cannot parse 'x' (want a number with optional K, M, G or T)"),
    (["--memory", "0"], "Invalid value: --memory: '0' is out of range"),
    (["--io-read-bps", "nodev"], "Invalid value for --io-read-bps: want DEV=VALUE (e.g. /dev/vda=1M), got 'nodev'"),
    (["--io-read-bps", "/dev/vda=-3"], "Invalid value for --io-read-bps: cannot parse '-3' (want a number with "),
    (["--io-read-iops", "/dev/null=-3"], "Invalid value for --io-read-iops: -3 is out of range (want 1 to "),
    (
        ["--io-write-iops", "/dev/vda=fast"],
        "Invalid value for --io-write-iops: cannot parse 'fast' (want a whole number)",
    ),
    (["--io-read-bps", "8:0=1M", "--io-read-bps", "8:0=2M"], "Invalid value: io read_bps for 8:0 given twice"),
    (["--timeout", "soon"], "Invalid value for '--timeout': cannot parse 'soon' (want seconds or e.g. 90s, 1m30s"),
    (["--timeout", "0"], "Invalid value for '--timeout': '0' is out of range"),
]


@pytest.mark.parametrize(("args", "said"), JOBCTL_SAYS)
def test_jobctl_says_what_it_said(args: list[str], said: str) -> None:
    result = CliRunner().invoke(jobctl_main.cli, ["start", *args, "--", "true"], obj={"client_factory": object})
    assert result.exit_code == 2
    assert result.output.startswith("Usage: ") and " start [OPTIONS]" in result.output.splitlines()[0]
    assert result.output.splitlines()[-1].startswith(f"Error: {said}"), result.output


def test_jobctl_stop_grace_has_a_maximum() -> None:
    result = CliRunner().invoke(jobctl_main.cli, ["stop", "abcd", "--grace", "2h"], obj={"client_factory": object})
    assert result.exit_code == 2
    assert (
        result.output.splitlines()[-1] == "Error: Invalid value for '--grace': '2h' is more than the maximum of 3600s"
    )


JOBSVC_SAYS = [
    (
        ["--default-cpu", "x"],
        "Invalid value for '--default-cpu': cpu: cannot parse 'x' (want CPUs as a decimal, e.g. 0.5)",
    ),
    (["--max-cpu", "0"], "Invalid value for '--max-cpu': must be a positive number of CPUs"),
    (["--default-memory", "0"], "Invalid value for '--default-memory': default_memory: '0' is out of range"),
    (["--max-output", "x"], "Invalid value for '--max-output': max_output: cannot parse 'x' (want a number with "),
    (
        ["--keep-finished-for", "x"],
        "Invalid value for '--keep-finished-for': keep_finished_for: cannot parse 'x' (want ",
    ),
    (["--default-timeout", "0"], "Invalid value for '--default-timeout': default_timeout: '0' is out of range"),
]


@pytest.mark.parametrize(("args", "said"), JOBSVC_SAYS)
def test_jobsvc_serve_says_what_it_said(tmp_path: Path, args: list[str], said: str) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("")
    files = ["--ca-cert", str(pem), "--server-cert", str(pem), "--server-key", str(pem)]
    result = CliRunner().invoke(cmd.main, ["serve", "--state-dir", str(tmp_path / "state"), *files, *args])
    assert result.exit_code == 2
    assert result.output.splitlines()[-1].startswith(f"Error: {said}"), result.output
    assert not (tmp_path / "state").exists()  # refused while reading the options: nothing was started


def test_jobctl_pings_no_more_often_than_jobsvc_takes_pings() -> None:
    # A client that pings more often than the server allows gets GOAWAY(too_many_pings) and loses its streams; the
    # two constants live in packages that may not import each other, so this is where they meet.
    options = dict(jobctl_client.CHANNEL_OPTIONS)
    assert options["grpc.keepalive_time_ms"] >= app.MIN_CLIENT_PING_INTERVAL * 1000
