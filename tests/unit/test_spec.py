"""validate_spec: a Start's request checked into a JobSpec, purely (the io device lookup is injected)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from jobsvc.errors import InvalidArgumentError
from jobsvc.limits import LimitPolicy
from jobsvc.manager import EngineConfig
from jobsvc.model import IoLimit, Limits
from jobsvc.spec import JobSpec, validate_spec

CONFIG = EngineConfig(
    state_dir=Path("/nonexistent"),
    policy=LimitPolicy(defaults=Limits(pids=100), maxima=Limits(memory_bytes=1 << 30), cpu_count=2),
    max_argv_bytes=64,
    max_argc=4,
    deny_env=frozenset({"LD_PRELOAD"}),
    max_timeout=3600.0,
)


def same(limits: Limits) -> Limits:
    return limits


def spec(
    argv: list[bytes | str],
    limits: Limits | None = None,
    env: dict[str, bytes | str] | None = None,
    workdir: str | None = None,
    timeout: float | None = None,
    config: EngineConfig = CONFIG,
) -> JobSpec:
    return validate_spec(argv, limits, env, workdir, timeout, config, resolve=same)


def test_a_valid_request_becomes_bytes_with_the_servers_defaults() -> None:
    got = spec(["echo", b"\xff"], Limits(cpu=0.5), {"A": "1", "B": b"\x01"}, "/tmp", 10)
    assert got == JobSpec(
        argv=(b"echo", b"\xff"),
        env={b"A": b"1", b"B": b"\x01"},
        workdir="/tmp",
        timeout=10,
        limits=Limits(cpu=0.5, pids=100),
    )
    assert spec(["true"]) == JobSpec((b"true",), limits=Limits(pids=100))


def test_the_spec_cannot_be_changed_after_the_checks() -> None:
    got = spec(["true"], env={"A": "1"})
    with pytest.raises(TypeError):
        got.env[b"A"] = b"2"  # type: ignore[index]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "command is empty"),
        ([""], r"command name \(argv\[0\]\) is empty"),
        (["a"] * 5, "command has 5 arguments, at most 4 allowed"),
        (["x" * 70], "command is 71 bytes, at most 64 allowed"),
        (["sh", "a\0b"], r"argv\[1\] contains a NUL byte"),
    ],
)
def test_argv_execve_or_the_server_would_refuse(argv: list[bytes | str], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        spec(argv)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"": "x"}, "environment variable name '' is invalid"),
        ({"A=B": "x"}, "environment variable name 'A=B' is invalid"),
        ({"LD_PRELOAD": "x.so"}, "environment variable LD_PRELOAD is not allowed by this server"),
        ({"A": "x\0y"}, "environment variable A contains a NUL byte"),
        ({"BIG": "x" * 60}, "command and environment are over 64 bytes together"),
    ],
)
def test_env_execve_or_the_server_would_refuse(env: dict[str, bytes | str], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        spec(["true"], env=env)


def test_a_relative_workdir_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="workdir must be an absolute path, got 'tmp'"):
        spec(["true"], workdir="tmp")


@pytest.mark.parametrize(
    ("timeout", "message"),
    [
        (0.0, "timeout must be a positive number of seconds, got 0.0"),
        (-1.0, "timeout must be a positive number of seconds"),
        (math.inf, "timeout must be a positive number of seconds, got inf"),
        (math.nan, "timeout must be a positive number of seconds, got nan"),
        (7200.0, "timeout 7200 s exceeds the server's maximum of 3600 s"),
    ],
)
def test_a_timeout_out_of_range_is_refused(timeout: float, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        spec(["true"], timeout=timeout)


def test_no_timeout_is_the_servers_default() -> None:
    config = EngineConfig(state_dir=Path("/nonexistent"), default_timeout=60.0)
    assert spec(["true"], config=config).timeout == 60.0
    assert spec(["true"]).timeout is None


def test_limits_are_checked_against_the_policy_after_the_devices_are_resolved() -> None:
    with pytest.raises(InvalidArgumentError, match="exceeds the server's maximum"):
        spec(["true"], Limits(memory_bytes=2 << 30))
    with pytest.raises(InvalidArgumentError, match="more than this host's 2 CPUs"):
        spec(["true"], Limits(cpu=3))
    asked = Limits(io=(IoLimit("/dev/sda", read_bps=1 << 20),))
    resolved = validate_spec(
        ["true"], asked, None, None, None, CONFIG, resolve=lambda lim: Limits(io=(IoLimit("8:0", read_bps=1 << 20),))
    )
    assert resolved.limits.io == (IoLimit("8:0", read_bps=1 << 20),)
    with pytest.raises(InvalidArgumentError, match="must be MAJ:MIN"):
        spec(["true"], asked)  # unresolved: a path is not a device number


def test_the_first_wrong_thing_is_named_argv_first() -> None:
    with pytest.raises(InvalidArgumentError, match="command is empty"):
        spec([], Limits(cpu=99), {"LD_PRELOAD": "x"}, "rel", -1)
    with pytest.raises(InvalidArgumentError, match="LD_PRELOAD"):
        spec(["true"], Limits(cpu=99), {"LD_PRELOAD": "x"}, "rel", -1)
    with pytest.raises(InvalidArgumentError, match="workdir"):
        spec(["true"], Limits(cpu=99), None, "rel", -1)
    with pytest.raises(InvalidArgumentError, match="timeout"):
        spec(["true"], Limits(cpu=99), None, None, -1)
