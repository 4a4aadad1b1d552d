"""Job: one process tree with its groups, its output log and its state machine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable

from jobsvc import codec
from jobsvc.budget import Budget
from jobsvc.capture import Capture
from jobsvc.cgroups.base import JobGroup
from jobsvc.cgroups.kill import KILL_TIMEOUT
from jobsvc.model import ExitInfo, JobRecord, Limits, Usage
from jobsvc.output import STDERR, STDOUT, OutputLog
from jobsvc.states import JobStatus, check_transition

log = logging.getLogger(__name__)

OUTPUT_DRAIN_TIMEOUT = 2.0
USAGE_TTL = 0.25  # seconds a running job's usage figures may be reused

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


_NO_BUDGET = Budget(None)  # for jobs outside any user's share (restored ones write nothing)
_NO_USAGE = Usage()  # frozen: the live figures of every restored job (it has no groups to read)
_EXITS: dict[tuple[int | None, int | None], ExitInfo] = {}  # frozen, and few tell every job's end apart


def _exit_info(exit_code: int | None, sig: int | None) -> ExitInfo:
    """ExitInfo(exit_code, sig), one instance per value that is an exit code or a signal number."""
    key = (exit_code, sig)
    info = _EXITS.get(key)
    if info is None:
        info = ExitInfo(exit_code, sig)
        if (exit_code is None or -1 <= exit_code <= 255) and (sig is None or 0 <= sig <= 128):
            _EXITS[key] = info
    return info


_DONE = asyncio.Event()  # the set event every restored job shares: waiting on it returns at once
_DONE.set()


class Job:
    """A running or ended job. All status changes go through _transition()."""

    # a server keeps every ended job until retention: 50,000 of them held 15 MB of instance dicts alone
    __slots__ = (
        "_budget", "_capture", "_clock", "_deadline", "_ended", "_live", "_persist", "_stop_deadline",
        "_stop_reason", "_stopping", "_supervisor", "_timeout_task", "_usage_at", "argv", "ended_at", "exit",
        "group", "id", "limits", "oom_killed", "output", "owner", "pid", "pids_limit_hit", "reason", "started_at",
        "status", "timeout_grace", "timeout_seconds", "uid", "usage", "workdir",
    )  # fmt: skip

    def __init__(
        self,
        job_id: str,
        owner: str,
        argv: tuple[bytes, ...],
        limits: Limits,
        group: JobGroup,
        output: OutputLog,
        clock: Clock = utc_now,
        uid: int | None = None,
        persist: Callable[[JobRecord], Awaitable[None]] | None = None,
        workdir: str | None = None,
        timeout: float | None = None,
        timeout_grace: float = 5.0,
        ended: bool = False,
        budget: Budget | None = None,
    ) -> None:
        self.id = job_id
        self.owner = owner
        self.argv = argv
        self.limits = limits
        self.group = group
        self.output = output
        self._clock = clock
        self._budget = budget if budget is not None else _NO_BUDGET
        self._persist = persist
        self.status = JobStatus.RUNNING
        self.started_at = clock()
        self.ended_at: dt.datetime | None = None
        self.pid: int | None = None
        self.uid = uid
        self.workdir = workdir
        self.timeout_seconds = timeout
        self.timeout_grace = timeout_grace
        self._deadline: asyncio.TimerHandle | None = None
        self._timeout_task: asyncio.Task[JobRecord] | None = None
        self.reason: str | None = None
        self.exit: ExitInfo | None = None
        self.oom_killed = False
        self.pids_limit_hit = False
        self.usage = Usage()
        self._live = Usage()  # the last figures read from a running job's groups
        self._usage_at = -1e9
        # a restored (ended) job shares one set event: two events fewer per kept job (760 B each)
        self._ended = _DONE if ended else asyncio.Event()
        self._stop_reason: str | None = None
        self._stop_deadline: float | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._capture: Capture | None = None

    @classmethod
    def restore(cls, record: JobRecord, group: JobGroup, output: OutputLog) -> Job:
        """An ended job read back from the state dir (its output stays streamable).

        Sets every slot itself rather than through __init__ (a restart restores 50,000 jobs): what an ended job
        holds is the record's fields and objects every restored job shares (tests/unit/test_job_restore.py checks
        that this is what __init__ would have left)."""
        if not record.status.ended:
            raise ValueError("only ended jobs can be restored")
        job = cls.__new__(cls)
        _restore_fields(job, record)
        job.owner = sys.intern(record.owner)  # one string per owner, not per job
        job.argv = record.command
        job.group = group
        job.output = output
        job.exit = _exit_info(record.exit_code, record.signal)
        job._clock = utc_now
        job._budget = _NO_BUDGET
        job._persist = None
        job.timeout_grace = 5.0
        job._deadline = job._timeout_task = None
        job._live = _NO_USAGE
        job._usage_at = -1e9
        job._ended = _DONE
        job._stop_reason = job._stop_deadline = job._stopping = job._supervisor = job._capture = None
        output.lost_bytes = max(output.lost_bytes, record.output_lost_bytes)
        return job

    # -- state ------------------------------------------------------------------------------------------------------

    def _transition(self, new: JobStatus) -> None:
        check_transition(self.status, new)
        self.status = new

    def record(self, usage: Usage | None = None) -> JobRecord:
        """The record: the fields the job holds under their own names, and these computed ones (usage, if given,
        in place of the figures the groups have: a job whose process has not exec'd yet has used nothing)."""
        exit_info = self.exit or ExitInfo(None, None)
        if usage is None:
            usage = self.usage if self.ended else self._live_usage()
        return _record_of(
            self,
            command=self.argv,
            exit_code=exit_info.exit_code,
            signal=exit_info.signal,
            usage=usage,
            output_bytes=self.output.size,
            output_dropped_bytes=self.output.start,
            output_lost_bytes=self.output.lost_bytes,
        )

    def _live_usage(self) -> Usage:
        # Reading four cgroup files costs about a third of a Get; a figure up to USAGE_TTL old is as good.
        now = time.monotonic()
        if now - self._usage_at > USAGE_TTL:
            self._live, self._usage_at = self.group.usage(), now
            # a hit never un-happens: once its groups are gone (the job's end), a read would say 0
            self.pids_limit_hit = self.pids_limit_hit or self._hit_pids_limit()
        return self._live

    def _hit_pids_limit(self) -> bool:
        return self.limits.pids is not None and self.group.pids_limit_hits() > 0

    @property
    def output_bytes(self) -> int:
        """The output it keeps on disk (retention's and the share's measure): lost offsets hold no bytes."""
        return max(0, self.output.size - self.output.start - self.output.lost_placed)

    @property
    def ended(self) -> bool:
        return self.status.ended

    async def wait(self) -> JobRecord:
        await self._ended.wait()
        return self.record()

    def abandon(self) -> None:
        """Its Start failed after the spawn (the job is being killed): its end writes no record, as none was
        acknowledged; a late one would bring back, after a restart, a job its client was told did not start."""
        self._persist = None

    # -- running ----------------------------------------------------------------------------------------------------

    def attach(self, pid: int, exit_status: asyncio.Future[int], stdout_r: int, stderr_r: int) -> None:
        """Take over a started process: capture its pipes into the log (a thread: jobsvc/capture.py) and supervise
        its end. Once it returns, the pipes are the capture's."""
        self.pid = pid
        loop = asyncio.get_running_loop()
        pipes = ((stdout_r, STDOUT), (stderr_r, STDERR))
        self._capture = Capture(f"capture-{self.id[:8]}", self.output, self._budget, pipes, self._output_lost)
        self._capture.start()
        self._supervisor = loop.create_task(self._supervise(exit_status), name=f"job-{self.id}")
        if self.timeout_seconds is not None:
            self._deadline = loop.call_later(self.timeout_seconds, self._on_timeout)

    def _on_timeout(self) -> None:
        if not self.ended:
            log.info("job %s: timed out after %.1f s", self.id, self.timeout_seconds or 0)
            task = asyncio.get_running_loop().create_task(self.stop(self.timeout_grace, reason="timeout"))
            self._timeout_task = task  # keep a reference until it is done

    def _output_lost(self, err: OSError | None) -> None:
        # from the capture thread (logging is thread-safe), at the first byte this job loses
        why = err if err is not None else f"{self.owner}'s share of the state dir is full"
        log.error("job %s: output lost (%s)", self.id, why)

    async def _finish_output(self) -> None:
        """The group is empty, so the pipes reach EOF at once, unless something escaped the group holding one;
        returns once every byte the capture read is in the log and visible."""
        capture = self._capture
        if capture is None:
            return
        try:
            await asyncio.wait_for(capture.done.wait(), OUTPUT_DRAIN_TIMEOUT)
        except TimeoutError:
            log.warning("job %s: a process outside the job holds its output pipe; closing it", self.id)
            capture.stop()
            await capture.done.wait()

    async def _supervise(self, exit_status: asyncio.Future[int]) -> None:
        try:
            status = await exit_status
        except ConnectionError:
            # The spawn helper died, so nobody can reap the leader: end the job by force.
            log.error("job %s: the spawn helper is gone; killing the job", self.id)
            status = signal.SIGKILL  # a wait status meaning "killed by SIGKILL"
            self._stop_reason = self._stop_reason or "spawn helper died"
        loop = asyncio.get_running_loop()
        if self._stop_deadline is not None:
            # A stop is in progress: the rest of the group gets its grace period too.
            while self.group.pids() and loop.time() < self._stop_deadline:
                await asyncio.sleep(0.01)
        # The leader is gone: like a service's main process (systemd) or a container's init, its end ends the job.
        if not await self.group.kill():
            log.error("job %s: processes survived SIGKILL for %.0f s", self.id, KILL_TIMEOUT)
        exit_info = ExitInfo.from_wait_status(status)
        oom_kills = self.group.oom_kills()
        if oom_kills == 0 and exit_info.signal == signal.SIGKILL:
            await asyncio.sleep(0.005)  # the kernel signals just before it counts the kill
            oom_kills = self.group.oom_kills()
        self.pids_limit_hit = self.pids_limit_hit or self._hit_pids_limit()
        self.usage = self.group.usage()
        if not await self.group.destroy():
            log.error("job %s: its groups could not be removed", self.id)
        await self._finish_output()
        self.exit = exit_info
        self.oom_killed = oom_kills > 0
        self.ended_at = self._clock()
        if self._stop_reason is not None:
            self.reason, final = self._stop_reason, JobStatus.STOPPED
        else:
            self.reason, final = ("oom" if self.oom_killed else None), JobStatus.FINISHED
        # The final record reaches the disk before any client can see it: what was said survives a crash.
        if self._persist is not None:
            await self._persist(dataclasses.replace(self.record(), status=final, usage=self.usage))
        if self._deadline is not None:
            self._deadline.cancel()
        # Status, log end and the ended event change together: a reader that sees the stream end sees the status.
        self._transition(final)
        self.output.close()
        self._ended.set()

    async def stop(self, grace: float, reason: str = "stopped by owner", sig: int = signal.SIGTERM) -> JobRecord:
        """Signal the whole job (SIGTERM), SIGKILL what is left after grace; returns once nothing of it is left."""
        if not self.ended and self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(grace, reason, sig))
        if self._stopping is not None:
            await asyncio.shield(self._stopping)
        await self._ended.wait()
        return self.record()

    async def _stop(self, grace: float, reason: str, sig: int) -> None:
        loop = asyncio.get_running_loop()
        self._stop_reason = reason
        self._stop_deadline = loop.time() + max(grace, 0.0)
        if grace > 0 or sig != signal.SIGKILL:
            self.group.signal(sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._ended.wait()), grace)
        if not self._ended.is_set():
            await self.group.kill()
        await self._ended.wait()


# One definition per record field: a field the job holds under its own name is copied both ways (a new field needs
# a slot of that name, or a place among the computed ones in record(), else record() fails); made once, compiled.
_COMPUTED = ("command", "exit_code", "signal", "usage", "output_bytes", "output_dropped_bytes", "output_lost_bytes")
_record_of = codec.from_attributes(JobRecord, _COMPUTED)
_restore_fields = codec.to_attributes(
    JobRecord, tuple(n for n in (f.name for f in dataclasses.fields(JobRecord)) if n in Job.__slots__)
)
