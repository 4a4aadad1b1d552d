"""The engine's data: frozen records and their one JSON form. Pure and stdlib-only (the CLI imports it)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from jobsvc.states import JobStatus


def format_time(t: dt.datetime | None) -> str | None:
    """UTC as RFC 3339 with a trailing Z (microseconds kept)."""
    if t is None:
        return None
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(s: str | None) -> dt.datetime | None:
    if s is None:
        return None
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


def display_arg(arg: bytes) -> str:
    """An argv element as text: UTF-8, with undecodable bytes shown as \\xNN escapes."""
    return arg.decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class IoLimit:
    """Throttles for one whole block device, addressed as MAJ:MIN."""

    device: str
    read_bps: int | None = None
    write_bps: int | None = None
    read_iops: int | None = None
    write_iops: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Limits:
    """Resource limits of one job; None means unlimited."""

    cpu: float | None = None  # CPUs, 0.25 = a quarter of one CPU
    memory_bytes: int | None = None
    pids: int | None = None
    io: tuple[IoLimit, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu,
            "memory_bytes": self.memory_bytes,
            "pids": self.pids,
            "io": [io.to_dict() for io in self.io],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Limits:
        return cls(
            cpu=d.get("cpu"),
            memory_bytes=d.get("memory_bytes"),
            pids=d.get("pids"),
            io=tuple(IoLimit(**io) for io in d.get("io") or ()),
        )


@dataclass(frozen=True)
class Usage:
    """What a job consumed, read from its groups (kept after they are removed)."""

    cpu_seconds: float | None = None
    cpu_throttled_periods: int | None = None
    memory_peak_bytes: int | None = None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Usage:
        return cls(**(d or {}))


@dataclass(frozen=True)
class ExitInfo:
    """How the leader ended: exit_code, or the signal that killed it (then exit_code is None)."""

    exit_code: int | None
    signal: int | None

    @classmethod
    def from_wait_status(cls, status: int) -> ExitInfo:
        import os

        if os.WIFSIGNALED(status):
            return cls(exit_code=None, signal=os.WTERMSIG(status))
        return cls(exit_code=os.waitstatus_to_exitcode(status), signal=None)


@dataclass(frozen=True)
class JobRecord:
    """Everything a client may know about a job, at one moment."""

    id: str
    owner: str
    command: tuple[bytes, ...]
    status: JobStatus
    started_at: dt.datetime
    limits: Limits = field(default_factory=Limits)
    pid: int | None = None
    reason: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    oom_killed: bool = False
    pids_limit_hit: bool = False  # a fork was refused at the job's pids limit
    ended_at: dt.datetime | None = None
    usage: Usage = field(default_factory=Usage)
    output_bytes: int = 0
    uid: int | None = None  # the Unix user the job runs as
    output_dropped_bytes: int = 0  # oldest output removed by retention (the first retained offset)
    output_lost_bytes: int = 0  # output that could not be stored (state dir's disk full)
    timeout_seconds: float | None = None
    workdir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The one JSON form of a job (what `jobctl --json` prints)."""
        return {
            "id": self.id,
            "owner": self.owner,
            "command": [display_arg(a) for a in self.command],
            "status": self.status.value,
            "reason": self.reason,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "oom_killed": self.oom_killed,
            "pids_limit_hit": self.pids_limit_hit,
            "pid": self.pid,
            "started_at": format_time(self.started_at),
            "ended_at": format_time(self.ended_at),
            "limits": self.limits.to_dict(),
            "usage": self.usage.to_dict(),
            "output_bytes": self.output_bytes,
            "uid": self.uid,
            "output_dropped_bytes": self.output_dropped_bytes,
            "output_lost_bytes": self.output_lost_bytes,
            "timeout_seconds": self.timeout_seconds,
            "workdir": self.workdir,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @property
    def wait_code(self) -> int:
        """The shell's view of how the job ended: its exit code, or 128 + signal."""
        if self.signal is not None:
            return 128 + self.signal
        return self.exit_code if self.exit_code is not None else 0
