"""JobManager: the engine's public API. Every call names its owner and sees only that owner's jobs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from jobsvc.cgroups.base import CgroupDriver, detect
from jobsvc.errors import InvalidArgumentError, UnavailableError, not_found
from jobsvc.job import Clock, Job, destroy_group, kill_group, utc_now
from jobsvc.limits import LimitPolicy, resolve_devices, validate
from jobsvc.model import JobRecord, Limits
from jobsvc.output import Chunk, OutputLog
from jobsvc.spawn import Spawner, SpawnError, SpawnRequest
from jobsvc.store import JobStore

log = logging.getLogger(__name__)

MIN_PREFIX = 4
DEFAULT_ENV: Mapping[bytes, bytes] = {
    b"PATH": b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    b"LANG": b"C.UTF-8",
    b"HOME": b"/",
}


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings; building one does no I/O."""

    state_dir: Path
    policy: LimitPolicy = field(default_factory=LimitPolicy)
    default_grace: float = 5.0
    max_argv_bytes: int = 128 * 1024
    max_argc: int = 4096
    durable: bool = True


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


class JobManager:
    """Start, stop, inspect and stream jobs, per owner."""

    def __init__(
        self,
        config: EngineConfig,
        driver: CgroupDriver,
        spawner: Spawner,
        store: JobStore,
        clock: Clock = utc_now,
    ) -> None:
        self.config = config
        self._driver = driver
        self._spawner = spawner
        self._store = store
        self._clock = clock
        self._jobs: dict[str, Job] = {}
        self._by_owner: dict[str, dict[str, Job]] = {}
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def open(cls, config: EngineConfig, driver: CgroupDriver | None = None) -> JobManager:
        """Set up the state dir, this instance's cgroups and the spawn helper."""
        store = JobStore(config.state_dir, durable=config.durable)
        if driver is None:
            driver = detect(store.instance_id())
        spawner = Spawner.launch()
        return cls(config, driver, spawner, store)

    @property
    def instance_groups(self) -> list[Path]:
        return list(self._driver.base_dirs)

    @property
    def helper_pid(self) -> int:
        return self._spawner.pid

    # -- lookups ----------------------------------------------------------------------------------------------------

    def _resolve(self, owner: str, job_id: str) -> Job:
        """A job of this owner by full id or unique prefix (at least MIN_PREFIX characters)."""
        mine = self._by_owner.get(owner, {})
        job = mine.get(job_id)
        if job is not None:
            return job
        if len(job_id) >= MIN_PREFIX:
            matches = [j for jid, j in mine.items() if jid.startswith(job_id)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise InvalidArgumentError(f"job id prefix {job_id!r} is ambiguous: {len(matches)} jobs match")
        raise not_found()

    def get(self, owner: str, job_id: str) -> JobRecord:
        return self._resolve(owner, job_id).record()

    def list(self, owner: str) -> list[JobRecord]:
        jobs = self._by_owner.get(owner, {}).values()
        return sorted((j.record() for j in jobs), key=lambda r: r.started_at)

    # -- lifecycle --------------------------------------------------------------------------------------------------

    async def start(self, owner: str, argv: Iterable[bytes | str], limits: Limits | None = None) -> JobRecord:
        """Start argv (no shell) in fresh groups with limits; fails with InvalidArgumentError if it cannot exec."""
        if self._closed:
            raise UnavailableError("the server is shutting down")
        args = check_argv(argv, self.config.max_argv_bytes, self.config.max_argc)
        limits = validate(resolve_devices(limits or Limits()), self.config.policy)
        job_id = str(uuid.uuid4())
        group = self._driver.create(job_id, limits)
        out_r = out_w = err_r = err_w = -1
        output: OutputLog | None = None
        try:
            output = OutputLog(self._store.output_dir(job_id))
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            request = SpawnRequest(argv=args, env=DEFAULT_ENV, cwd=b"/", join_files=group.join_files)
            job = Job(job_id, owner, args, limits, group, output, self._clock)
            try:
                pid, exit_status = await self._spawner.spawn(request, out_w, err_w)
            except SpawnError as e:
                raise _spawn_error(args[0], e) from None
            finally:
                os.close(out_w)
                os.close(err_w)
                out_w = err_w = -1
            job.attach(pid, exit_status, out_r, err_r)
            out_r = err_r = -1
        except BaseException:
            for fd in (out_r, out_w, err_r, err_w):
                if fd >= 0:
                    os.close(fd)
            if output is not None:
                output.close()
            await kill_group(group)
            await destroy_group(group)
            self._store.remove(job_id)
            raise
        self._jobs[job_id] = job
        self._by_owner.setdefault(owner, {})[job_id] = job
        record = job.record()
        self._store.save(record)
        task = asyncio.get_running_loop().create_task(self._persist_end(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return record

    async def _persist_end(self, job: Job) -> None:
        record = await job.wait()
        try:
            self._store.save(record)
        except OSError:
            log.exception("job %s: could not save its final record", job.id)

    async def stop(self, owner: str, job_id: str, grace: float | None = None) -> JobRecord:
        """Stop the whole job (SIGTERM, SIGKILL after grace); an ended job's record comes back unchanged."""
        if grace is not None and not (0 <= grace <= 3600):
            raise InvalidArgumentError(f"grace must be between 0 and 3600 seconds, got {grace}")
        job = self._resolve(owner, job_id)
        if job.ended:
            return job.record()
        return await job.stop(self.config.default_grace if grace is None else grace)

    async def wait(self, owner: str, job_id: str) -> JobRecord:
        """Block until the job has ended; its final record."""
        return await self._resolve(owner, job_id).wait()

    def stream(self, owner: str, job_id: str, from_offset: int = 0) -> AsyncIterator[Chunk]:
        """The job's output from from_offset, then live until it has ended and everything was delivered."""
        if from_offset < 0:
            raise InvalidArgumentError(f"from_offset must not be negative, got {from_offset}")
        return self._resolve(owner, job_id).output.follow(from_offset)

    async def shutdown(self, grace: float | None = None, reason: str = "server shutting down") -> None:
        """Stop every running job and the spawn helper; remove this instance's groups."""
        self._closed = True
        g = self.config.default_grace if grace is None else grace
        running = [j for j in self._jobs.values() if not j.ended]
        await asyncio.gather(*(j.stop(g, reason) for j in running), return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)  # the final records reach the disk
        self._spawner.close()
        with contextlib.suppress(OSError):
            self._driver.remove_instance()


def _spawn_error(name: bytes, e: SpawnError) -> Exception:
    shown = name.decode("utf-8", "backslashreplace")
    if e.stage in ("exec", "cwd", "user"):
        return InvalidArgumentError(f"cannot execute {shown!r}: {e.strerror}")
    if e.stage == "request":
        return InvalidArgumentError(f"cannot start {shown!r}: {e.detail or e.strerror}")
    return RuntimeError(f"starting {shown!r} failed at {e.stage}: {e.strerror}")
