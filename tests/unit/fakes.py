"""In-memory edges for the engine: a spawner that "runs" jobs, cgroups that record, a clock the test moves.

A FakeProcess stands for a job's leader: it holds its own copies of the pipes' write ends (as a real child does), so
its output reaches the engine through real pipes and its exit closes them. It exits when the test says, at a signal
it does not ignore, or at SIGKILL; its wait status reaches the engine through the future the spawner returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import os
import signal
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jobsvc.errors import InvalidArgumentError, ResourceExhaustedError
from jobsvc.manager import EngineConfig, JobManager
from jobsvc.model import Limits, Usage
from jobsvc.spawn import HasFileno, SpawnError, SpawnRequest
from jobsvc.store import JobStore
from jobsvc.users import JobUser


class FakeClock:
    """The engine's wall clock; time moves only when the test advances it."""

    def __init__(self, start: dt.datetime = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def exited(code: int) -> int:
    """The wait status of a process that exited with code."""
    return code << 8


class FakeProcess:
    """One process of a job: it writes to its pipes and ends when told to or signalled."""

    def __init__(self, pid: int, stdout: int | None, stderr: int | None, ignores: frozenset[int]) -> None:
        self.pid = pid
        self._fds = {1: stdout, 2: stderr}
        self.ignores = ignores  # signals it survives (never SIGKILL)
        self.status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.alive = True
        self.received: list[int] = []

    async def write(self, data: bytes, stream: int = 1) -> None:
        """Write all of data to stdout (1) or stderr (2), letting the engine drain the pipe meanwhile."""
        fd = self._fds[stream]
        assert fd is not None, "this process has no pipes"
        os.set_blocking(fd, False)
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                await asyncio.sleep(0)

    def exit(self, status: int = 0) -> None:
        """End with this wait status: the pipes close (EOF for the engine) and the spawner reports it."""
        if not self.alive:
            return
        self.alive = False
        for stream, fd in self._fds.items():
            if fd is not None:
                os.close(fd)
                self._fds[stream] = None
        if not self.status.done():
            self.status.set_result(status)

    def signal(self, sig: int) -> None:
        self.received.append(sig)
        if sig == signal.SIGKILL or sig not in self.ignores:
            self.exit(sig)  # a wait status of "killed by sig"

    def orphan(self) -> None:
        """Its parent (the spawn helper) died: nobody will report its exit."""
        if not self.status.done():
            self.status.set_exception(ConnectionError("the spawn helper exited"))


class FakeGroup:
    """A job's groups: the processes in them, and what the engine did to them."""

    def __init__(self, job_id: str, limits: Limits) -> None:
        self.job_id = job_id
        self.limits = limits
        self.processes: list[FakeProcess] = []
        self.signals: list[int] = []
        self.kills = 0
        self.destroyed = False
        self.oom = 0
        self.pids_hits = 0
        self.used = Usage(cpu_seconds=0.25, memory_peak_bytes=1 << 20)

    @property
    def join_files(self) -> Sequence[str]:
        return (f"fake-cgroup/{self.job_id}/cgroup.procs",)

    @property
    def dirs(self) -> Sequence[Path]:
        return ()

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.alive]

    def signal(self, sig: int) -> int:
        self.signals.append(sig)
        alive = [p for p in self.processes if p.alive]
        for p in alive:
            p.signal(sig)
        return len(alive)

    async def kill(self) -> bool:
        self.kills += 1
        for p in self.processes:
            if p.alive:
                p.signal(signal.SIGKILL)
        return True

    def oom_kills(self) -> int:
        return self.oom

    def pids_limit_hits(self) -> int:
        return self.pids_hits

    def usage(self) -> Usage:
        return self.used

    async def destroy(self) -> bool:
        self.destroyed = not self.pids()
        return self.destroyed


class FakeDriver:
    """Makes FakeGroups; refuse= makes create() fail as a kernel refusing a limit does."""

    name = "fake cgroups"

    def __init__(self, left_over: Sequence[str] = ()) -> None:
        self.groups: dict[str, FakeGroup] = {job_id: FakeGroup(job_id, Limits()) for job_id in left_over}
        self.refuse: str | None = None
        self.instance_removed = False

    def create(self, job_id: str, limits: Limits) -> FakeGroup:
        if self.refuse is not None:
            raise InvalidArgumentError(self.refuse)
        group = self.groups[job_id] = FakeGroup(job_id, limits)
        return group

    def existing(self) -> list[str]:
        return [job_id for job_id, g in self.groups.items() if not g.destroyed]

    def open(self, job_id: str) -> FakeGroup:
        return self.groups.setdefault(job_id, FakeGroup(job_id, Limits()))

    def remove_instance(self) -> bool:
        self.instance_removed = True
        return True

    @property
    def base_dirs(self) -> Sequence[Path]:
        return ()

    def joined(self, join_files: Sequence[str]) -> FakeGroup:
        (group,) = (g for g in self.groups.values() if tuple(g.join_files) == tuple(join_files))
        return group


class FakeSpawner:
    """Starts FakeProcesses in the groups a request names. fail= makes the next spawns fail as the helper says;
    hold= makes spawn wait for that future first (a slow helper); die() is the helper's death."""

    def __init__(self, driver: FakeDriver, generation: int = 1) -> None:
        self.driver = driver
        self.generation = generation
        self.requests: list[SpawnRequest] = []
        self.processes: list[FakeProcess] = []
        self.fail: SpawnError | None = None
        self.hold: asyncio.Future[None] | None = None
        self.ignores: frozenset[int] = frozenset()  # signals the next processes survive
        self.replaced_by: FakeSpawner | None = None
        self.closed = False
        self._alive = True
        self._next_pid = 1000 * generation

    @property
    def pid(self) -> int:
        return 100 + self.generation

    @property
    def alive(self) -> bool:
        return self._alive

    async def spawn(
        self, req: SpawnRequest, stdout: HasFileno, stderr: HasFileno, forked: Callable[[int], None] | None = None
    ) -> tuple[int, asyncio.Future[int]]:
        if self.hold is not None:
            await self.hold
        if self.fail is not None:
            if self.fail.stage not in ("request", "fork") and forked is not None:
                self._next_pid += 1
                forked(self._next_pid)  # the real helper tells the fork before its child fails
            raise self.fail
        self.requests.append(req)
        self._next_pid += 1
        # the child's own copies, as SCM_RIGHTS gives the real helper
        proc = FakeProcess(self._next_pid, os.dup(stdout.fileno()), os.dup(stderr.fileno()), self.ignores)
        self.driver.joined(req.join_files).processes.append(proc)
        self.processes.append(proc)
        if forked is not None:
            forked(proc.pid)
        return proc.pid, proc.status

    def launch(self) -> FakeSpawner:
        self.replaced_by = FakeSpawner(self.driver, self.generation + 1)
        return self.replaced_by

    def die(self) -> None:
        self._alive = False
        for proc in self.processes:
            proc.orphan()

    def close(self) -> None:
        self.closed = True


class FakeWorkspace:
    """Working directories under a tmp dir, without the chown (which needs root); records the rest."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.retired: list[str] = []
        self.private_removed: list[str] = []
        self.removed: list[str] = []

    def make_workdir(self, job_id: str, uid: int, gid: int) -> Path:
        path = self.root / job_id
        path.mkdir(parents=True)
        return path

    def make_private(self, job_id: str) -> tuple[str, str]:
        return str(self.root / ".private" / f"{job_id}.tmp"), str(self.root / ".private" / f"{job_id}.var-tmp")

    def retire(self, job_id: str) -> None:
        self.retired.append(job_id)

    def clear_private(self, job_id: str) -> bool:
        return False  # as if the job left files there: the engine removes them in a thread

    def remove_private(self, job_id: str) -> None:
        self.private_removed.append(job_id)

    def remove(self, job_id: str) -> None:
        self.removed.append(job_id)
        with contextlib.suppress(FileNotFoundError):
            (self.root / job_id).rmdir()


class FakeUsers:
    """size uids from 70000; held says which are out."""

    def __init__(self, size: int = 64) -> None:
        self.free = list(range(70000, 70000 + size))
        self.held: set[int] = set()

    def acquire(self) -> JobUser:
        if not self.free:
            raise ResourceExhaustedError("all job uids are in use")
        uid = self.free.pop(0)
        self.held.add(uid)
        return JobUser(uid, uid)

    def release(self, user: JobUser) -> None:
        self.held.remove(user.uid)  # a second release is a bug: KeyError
        self.free.append(user.uid)


@dataclass
class Engine:
    """A JobManager over fakes, and the fakes to drive and inspect it."""

    manager: JobManager
    driver: FakeDriver
    spawner: FakeSpawner
    clock: FakeClock
    work: FakeWorkspace
    users: FakeUsers
    store: JobStore
    ids: list[str] = field(default_factory=list)  # the ids the next Starts get, in order (else random)

    def group(self, job_id: str) -> FakeGroup:
        return self.driver.groups[job_id]

    def process(self, job_id: str) -> FakeProcess:
        return self.group(job_id).processes[0]


def engine_config(tmp_path: Path, **settings: object) -> EngineConfig:
    settings.setdefault("janitor_interval", 3600.0)  # the tests run retention themselves (collect_garbage)
    return EngineConfig(
        state_dir=tmp_path / "state",
        durable=False,
        work_root=tmp_path / "work",
        uid_lock_dir=None,
        **settings,  # type: ignore[arg-type]
    )


def make_engine(
    tmp_path: Path, driver: FakeDriver | None = None, clock: FakeClock | None = None, **settings: object
) -> Engine:
    """A manager over fakes on a state dir in tmp_path; settings are EngineConfig fields."""
    config = engine_config(tmp_path, **settings)
    driver = driver if driver is not None else FakeDriver()
    spawner = FakeSpawner(driver)
    clock = clock if clock is not None else FakeClock()
    work, users = FakeWorkspace(config.work_root), FakeUsers()
    store = JobStore(config.state_dir, durable=False)
    ids: list[str] = []

    def new_id() -> str:
        return ids.pop(0) if ids else str(uuid.uuid4())

    manager = JobManager(config, driver, spawner, store, clock, users=users, work=work, new_id=new_id)
    return Engine(manager, driver, spawner, clock, work, users, store, ids)


def no_such_file() -> SpawnError:
    return SpawnError(errno.ENOENT, "exec", "")
