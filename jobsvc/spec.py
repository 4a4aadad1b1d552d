"""JobSpec: what a Start asks for, checked. validate_spec() is pure but for the io devices' lookup (injected)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from jobsvc.errors import InvalidArgumentError
from jobsvc.limits import LimitPolicy, resolve_devices, validate
from jobsvc.model import Limits


class SpecRules(Protocol):
    """The server settings a Start is checked against (EngineConfig has them)."""

    @property
    def policy(self) -> LimitPolicy: ...

    @property
    def max_argv_bytes(self) -> int: ...

    @property
    def max_argc(self) -> int: ...

    @property
    def deny_env(self) -> frozenset[str]: ...

    @property
    def default_timeout(self) -> float | None: ...

    @property
    def max_timeout(self) -> float | None: ...


@dataclass(frozen=True)
class JobSpec:
    """A Start that passed every check: argv and env as execve takes them, limits with the server's defaults."""

    argv: tuple[bytes, ...]
    env: Mapping[bytes, bytes] = field(default_factory=lambda: MappingProxyType({}))  # added to the clean env
    workdir: str | None = None  # absolute; None: a fresh working directory
    timeout: float | None = None  # seconds; the job is stopped (reason "timeout") when it runs longer
    limits: Limits = field(default_factory=Limits)


def validate_spec(
    argv: Iterable[bytes | str],
    limits: Limits | None,
    env: Mapping[str, bytes | str] | None,
    workdir: str | None,
    timeout: float | None,
    rules: SpecRules,
    resolve: Callable[[Limits], Limits] = resolve_devices,
) -> JobSpec:
    """The JobSpec of a Start, or InvalidArgumentError naming what is wrong (checked in this order: argv, env,
    their size together, workdir, timeout, limits). resolve turns each io device into MAJ:MIN of its disk."""
    args = check_argv(argv, rules.max_argv_bytes, rules.max_argc)
    extra_env = check_env(env or {}, rules.deny_env)
    size = sum(len(a) + 1 for a in args) + sum(len(k) + len(v) + 2 for k, v in extra_env.items())
    if size > rules.max_argv_bytes:
        raise InvalidArgumentError(f"command and environment are over {rules.max_argv_bytes} bytes together")
    if workdir is not None and not os.path.isabs(workdir):
        raise InvalidArgumentError(f"workdir must be an absolute path, got {workdir!r}")
    checked_timeout = check_timeout(timeout, rules.default_timeout, rules.max_timeout)
    checked_limits = validate(resolve(limits or Limits()), rules.policy)
    return JobSpec(args, MappingProxyType(extra_env), workdir, checked_timeout, checked_limits)


def check_env(env: Mapping[str, bytes | str], deny: frozenset[str]) -> dict[bytes, bytes]:
    """Environment variables a client asked for, as bytes; refuses names execve cannot carry or the server denies."""
    out: dict[bytes, bytes] = {}
    for name, value in env.items():
        if not name or "=" in name or "\0" in name:
            raise InvalidArgumentError(f"environment variable name {name!r} is invalid (empty, '=' or NUL)")
        if name in deny:
            raise InvalidArgumentError(f"environment variable {name} is not allowed by this server")
        raw = os.fsencode(value)
        if b"\0" in raw:
            raise InvalidArgumentError(f"environment variable {name} contains a NUL byte")
        out[os.fsencode(name)] = raw
    return out


def check_argv(argv: Iterable[bytes | str], max_bytes: int, max_argc: int) -> tuple[bytes, ...]:
    """argv as bytes, refusing what execve cannot take or the server will not."""
    args = tuple(os.fsencode(a) for a in argv)
    if not args:
        raise InvalidArgumentError("command is empty")
    if not args[0]:
        raise InvalidArgumentError("command name (argv[0]) is empty")
    if len(args) > max_argc:
        raise InvalidArgumentError(f"command has {len(args)} arguments, at most {max_argc} allowed")
    total = sum(len(a) + 1 for a in args)
    if total > max_bytes:
        raise InvalidArgumentError(f"command is {total} bytes, at most {max_bytes} allowed")
    for i, a in enumerate(args):
        if b"\0" in a:
            raise InvalidArgumentError(f"argv[{i}] contains a NUL byte")
    return args


def check_timeout(timeout: float | None, default: float | None, maximum: float | None) -> float | None:
    """The job's timeout: the one asked for (positive, finite, at most maximum) or the server's default."""
    if timeout is None:
        return default
    if not (timeout > 0 and math.isfinite(timeout)):
        raise InvalidArgumentError(f"timeout must be a positive number of seconds, got {timeout}")
    if maximum is not None and timeout > maximum:
        raise InvalidArgumentError(f"timeout {timeout:g} s exceeds the server's maximum of {maximum:g} s")
    return timeout
