"""The engine's data: frozen records and their one JSON form. Pure and stdlib-only (the CLI imports it)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from jobsvc.codec import display_arg, format_time, json_encoder, parse_time
from jobsvc.states import JobStatus

__all__ = ["ExitInfo", "IoLimit", "JobRecord", "Limits", "Usage", "display_arg", "format_time", "parse_time"]


@dataclass(frozen=True)
class IoLimit:
    """Throttles for one whole block device, addressed as MAJ:MIN."""

    device: str
    read_bps: int | None = None
    write_bps: int | None = None
    read_iops: int | None = None
    write_iops: int | None = None


@dataclass(frozen=True)
class Limits:
    """Resource limits of one job; None means unlimited."""

    cpu: float | None = None  # CPUs, 0.25 = a quarter of one CPU
    memory_bytes: int | None = None
    pids: int | None = None
    io: tuple[IoLimit, ...] = ()


@dataclass(frozen=True)
class Usage:
    """What a job consumed, read from its groups (kept after they are removed)."""

    cpu_seconds: float | None = None
    cpu_throttled_periods: int | None = None
    memory_peak_bytes: int | None = None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None


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


@dataclass(frozen=True, kw_only=True)
class JobRecord:
    """Everything a client may know about a job, at one moment.

    The fields are its JSON form, in this order (jobsvc.codec derives the JSON, store and wire forms from them);
    a new field is an edit here and in proto/jobsvc/v1/jobs.proto.
    """

    id: str
    owner: str
    command: tuple[bytes, ...]
    status: JobStatus
    reason: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    oom_killed: bool = False
    pids_limit_hit: bool = False  # a fork was refused at the job's pids limit
    pid: int | None = None
    started_at: dt.datetime
    ended_at: dt.datetime | None = None
    limits: Limits = field(default_factory=Limits)
    usage: Usage = field(default_factory=Usage)
    output_bytes: int = 0
    uid: int | None = None  # the Unix user the job runs as
    output_dropped_bytes: int = 0  # oldest output removed by retention (the first retained offset)
    output_lost_bytes: int = 0  # output that could not be stored (state dir's disk full)
    timeout_seconds: float | None = None
    workdir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The one JSON form of a job (what `jobctl --json` prints)."""
        return json_encoder(JobRecord)(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @property
    def wait_code(self) -> int:
        """The shell's view of how the job ended: its exit code, or 128 + signal."""
        if self.signal is not None:
            return 128 + self.signal
        return self.exit_code if self.exit_code is not None else 0
