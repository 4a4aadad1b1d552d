"""JobManager: the engine's public API. Every call names its owner and sees only that owner's jobs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import errno
import functools
import gc
import logging
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from jobsvc.authz import Authz
from jobsvc.budget import Budget
from jobsvc.catalog import Catalog
from jobsvc.cgroups.base import ENDED, CgroupDriver, JobGroup, detect
from jobsvc.errors import InvalidArgumentError, ResourceExhaustedError, UnavailableError, not_found
from jobsvc.heap import release_free_heap
from jobsvc.job import Clock, Job, utc_now
from jobsvc.limits import LimitPolicy
from jobsvc.model import JobRecord, Limits, Usage
from jobsvc.output import Chunk, OutputLog, chunk_size_for, segment_size_for
from jobsvc.pipe import pipe
from jobsvc.quota import Quota
from jobsvc.records import RecordWriter
from jobsvc.retention import EndedJobs, Policy
from jobsvc.spawn import HelperSpawner, Spawner, SpawnError, SpawnRequest
from jobsvc.spec import JobSpec, validate_spec
from jobsvc.states import JobStatus
from jobsvc.store import NEVER_ACKNOWLEDGED, REMOVED, JobStore
from jobsvc.users import DYNAMIC_RANGE, FixedUser, JobUser, UidPool, UserPool, named_user
from jobsvc.workroot import WorkRoot, Workspace

log = logging.getLogger(__name__)

MIN_PREFIX = 4
LIST_PAGE = 500  # jobs per List page unless the client asks for fewer
LIST_PAGE_MAX = 1000
# A job's whole environment: nothing of the server's leaks into it. HOME is its working directory.
BASE_ENV: Mapping[bytes, bytes] = {
    b"PATH": b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    b"LANG": b"C.UTF-8",
}
JOB_UMASK = 0o077


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings; building one does no I/O."""

    state_dir: Path
    policy: LimitPolicy = field(default_factory=LimitPolicy)
    default_grace: float = 5.0
    max_argv_bytes: int = 128 * 1024
    max_argc: int = 4096
    durable: bool = True
    work_root: Path = Path("/var/tmp/jobsvc")  # each job gets a fresh working directory here
    private_tmp: bool = True  # each job gets its own /tmp, /var/tmp, /dev/shm, IPC and a /proc of its own uid
    uid_lock_dir: Path | None = Path("/run/jobsvc/uids")  # host-wide: two servers never hand out one uid
    job_user: str | None = None  # None: a transient uid per job from uid_range
    uid_range: tuple[int, int] = DYNAMIC_RANGE
    admins: frozenset[str] = frozenset()
    max_running_per_user: int = 128
    max_running_total: int = 512
    max_streams_per_user: int = 512
    max_output_bytes: int | None = 1 << 30  # per job; the oldest output is dropped past it
    max_total_output_bytes: int | None = 10 << 30  # the whole state dir
    # one user's output at most; None: a quarter of the smaller of max_total_output_bytes and the state disk
    max_output_per_user: int | None = None
    keep_finished_per_user: int | None = 1000
    keep_finished_seconds: float | None = 7 * 24 * 3600.0
    min_free_bytes: int = 8 << 20  # Start is refused when the state dir's disk has less free
    janitor_interval: float = 2.0
    deny_env: frozenset[str] = frozenset({"LD_PRELOAD"})
    default_timeout: float | None = None
    max_timeout: float | None = None


def user_pool(config: EngineConfig) -> UserPool:
    """The users jobs run as, as configured: one named account, or a transient uid per job."""
    if config.job_user is not None:
        return FixedUser(named_user(config.job_user))
    return UidPool(*config.uid_range, lock_dir=config.uid_lock_dir)


@dataclass(frozen=True)
class Lodging:
    """Where a job being started lives: its user, its fresh working directory (HOME), its private /tmp dirs."""

    user: JobUser
    home: Path
    private: tuple[str, str] | None


class JobManager:
    """Start, stop, inspect and stream jobs, per owner."""

    def __init__(
        self,
        config: EngineConfig,
        driver: CgroupDriver,
        spawner: Spawner,
        store: JobStore,
        clock: Clock = utc_now,
        *,
        users: UserPool | None = None,
        work: Workspace | None = None,
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        """The engine over its edges; users and work default to the configured ones (JobManager.open)."""
        self.config = config
        self._driver = driver
        self._spawner = spawner
        self._store = store
        self._clock = clock
        self._new_id = new_id
        self._jobs: Catalog[Job] = Catalog()
        self._live: dict[str, Job] = {}  # the running jobs (their output still grows)
        self._ended: EndedJobs[Job] = EndedJobs()  # the ended ones, in the order they ended (retention)
        self._policy = Policy(
            config.keep_finished_seconds, config.keep_finished_per_user, config.max_total_output_bytes
        )
        self._budgets: dict[str, Budget] = {}
        self._share = user_share(config, store.root)
        self._authz = Authz(config.admins)
        self._uids = users if users is not None else user_pool(config)
        self._work = work if work is not None else WorkRoot(config.work_root)
        self._users: dict[str, JobUser] = {}  # a running job's id -> the user it holds
        self._running = Quota("running jobs", config.max_running_per_user, config.max_running_total)
        self._streams = Quota("concurrent streams", config.max_streams_per_user)  # .total sizes the messages
        self._trim_due = False  # the last open stream ended: give its buffers back (janitor)
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._launching: set[asyncio.Task[JobRecord]] = set()  # Starts in flight, whether or not a caller waits
        # Starts in flight whose start record is queued: its write (see _unrecord)
        self._recorded: dict[str, asyncio.Future[None]] = {}
        # Records are written in batches (one fdatasync each) by the writer's thread, and jobs' files deleted by
        # its other one: an fsync or an rmtree on the event loop made every call and stream wait with it.
        self._records = RecordWriter(store, self._delete_files)
        self._janitor: asyncio.Task[None] | None = None
        self.skipped: list[tuple[str, str]] = []  # state-dir entries reconcile() could not read

    @classmethod
    def open(cls, config: EngineConfig, driver: CgroupDriver | None = None) -> JobManager:
        """Set up the state dir, the work root, this instance's cgroups and the spawn helper."""
        store = JobStore(config.state_dir, durable=config.durable)  # first: it locks the state dir
        detected: CgroupDriver | None = None
        try:
            WorkRoot(config.work_root).prepare()
            if driver is None:
                driver = detected = detect(store.instance_id())
            log.info("%s: job groups beneath %s", driver.name, ", ".join(map(str, driver.base_dirs)))
            # after detect(): on v2 the server has moved into its leaf, and the helper follows
            spawner = HelperSpawner.launch()
        except BaseException:
            if detected is not None:  # the parent groups detect() made
                _remove_empty_instance(detected)
            store.close()
            raise
        return cls(config, driver, spawner, store)

    async def reconcile(self) -> None:
        """Take over the state dir after a restart or crash, then start the janitor.

        Jobs recorded as running are killed (their groups emptied and removed) and marked stopped, reason "server
        restarted"; their output stays streamable. Groups of this instance with no record are emptied and removed.
        Other instances' groups are never touched, and unreadable records are reported and left in place.
        """
        # Everything a restart makes is kept (the records are dropped at the end, by their counts): the cyclic
        # collector's passes over the growing heap were a third of a 50,000-job restart, and found nothing.
        collecting = gc.isenabled()
        gc.disable()
        try:
            records, self.skipped = self._store.load_all()
            self._records.open(records, [name for name, why in self.skipped if why == REMOVED])
            for name, why in self.skipped:
                if why in (NEVER_ACKNOWLEDGED, REMOVED):
                    log.info("removing %s: %s", name, "a start that was never acknowledged" if why != REMOVED else why)
                    self._records.remove(name)
                else:
                    log.warning("state dir: skipping %s: %s", name, why)
            taken_over: list[JobRecord] = []
            restored = [self._restore(r) if r.status.ended else await self._take_over(r, taken_over) for r in records]
            await self._records.persist_all(taken_over)  # in shared commits, not one fdatasync each
            self._jobs.extend(restored)
            for job in restored:
                self._budget(job.owner).used += job.output_bytes
            epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
            self._ended.extend(sorted(restored, key=lambda j: j.ended_at or epoch))
            del records, taken_over  # the jobs hold what they need of them
        finally:
            if collecting:
                gc.enable()
        for orphan in set(self._driver.existing()) - {job.id for job in restored}:
            log.warning("removing cgroup of unknown job %s", orphan)
            await _discard_group(self._driver.open(orphan))
        if restored or self.skipped:
            log.info("state dir: %d jobs restored, %d entries skipped", len(restored), len(self.skipped))
        self._janitor = asyncio.get_running_loop().create_task(self._janitor_loop())

    def _restore(self, record: JobRecord) -> Job:
        """An ended job: its groups went with it; its output is read when someone streams it."""
        output = OutputLog.ended(
            self._store.output_path(record.id),
            record.output_bytes,
            record.output_dropped_bytes,
            record.output_lost_bytes,
        )
        return Job.restore(record, ENDED, output)

    async def _take_over(self, record: JobRecord, taken_over: list[JobRecord]) -> Job:
        """A job the last server left running: killed, its groups removed, its record as stopped added to
        taken_over (for the caller to save)."""
        group = self._driver.open(record.id)
        await _discard_group(group)
        self._work.retire(record.id)  # as at a job's end: its uid will run other jobs
        self._work.remove_private(record.id)
        output = OutputLog.recover(self._store.output_dir(record.id))
        record = dataclasses.replace(
            record,
            status=JobStatus.STOPPED,
            reason="server restarted",
            ended_at=self._clock(),
            output_bytes=output.size,
            output_dropped_bytes=output.start,
        )
        taken_over.append(record)
        return Job.restore(record, group, output)

    def _budget(self, owner: str) -> Budget:
        budget = self._budgets.get(owner)
        if budget is None:
            budget = self._budgets[owner] = Budget(self._share, functools.partial(self._reclaim, owner))
        return budget

    def _reclaim(self, owner: str) -> None:
        """Remove owner's oldest ended jobs until their output fits their share (the capture asks, on the loop)."""
        excess = self._budget(owner).excess
        for job in self._ended.select(Policy(), self._clock(), user_excess={owner: excess}):
            if job.output.readers == 0:
                self._remove(job)

    def _add(self, job: Job) -> None:
        self._jobs.add(job)
        if not job.ended:
            self._live[job.id] = job

    @property
    def instance_groups(self) -> list[Path]:
        return list(self._driver.base_dirs)

    @property
    def helper_pid(self) -> int:
        return self._spawner.pid

    # -- lookups ----------------------------------------------------------------------------------------------------

    def _scope(self, identity: str) -> str | None:
        """Whose jobs identity sees: its own, or everyone's (None) for an admin."""
        return None if self._authz.is_admin(identity) else identity

    def _resolve(self, owner: str, job_id: str) -> Job:
        """A job this identity may act on, by full id or unique prefix (at least MIN_PREFIX characters)."""
        scope = self._scope(owner)
        job = self._jobs.find(scope, job_id)
        if job is not None:
            return job
        if len(job_id) >= MIN_PREFIX:
            matches = self._jobs.with_prefix(scope, job_id)
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise InvalidArgumentError(f"job id prefix {job_id!r} is ambiguous: more than one job matches")
        raise not_found()

    def get(self, owner: str, job_id: str) -> JobRecord:
        return self._resolve(owner, job_id).record()

    def list_page(
        self,
        owner: str,
        status: JobStatus | None = None,
        since: float | None = None,
        *,
        after: tuple[dt.datetime, str] | None = None,
        limit: int = LIST_PAGE,
        newest_first: bool = False,
    ) -> tuple[list[JobRecord], bool]:
        """A page of the jobs this identity may see, oldest first (or newest first), after the (started_at, id)
        of the last one of the previous page; optionally one status, or started in the last N s. Also whether
        more follow. Without a status a page costs what its jobs cost, however many jobs the server keeps; with one,
        it walks past the jobs that do not match."""
        if since is not None and not since > 0:
            raise InvalidArgumentError(f"since must be a positive number of seconds, got {since}")
        if not 0 < limit <= LIST_PAGE_MAX:
            raise InvalidArgumentError(f"page size must be between 1 and {LIST_PAGE_MAX}, got {limit}")
        cutoff = None if since is None else self._clock() - dt.timedelta(seconds=min(since, 1e9))
        jobs, more = self._jobs.page(
            self._scope(owner),
            after=after,
            newest_first=newest_first,
            started_since=cutoff,
            keep=(lambda j: True) if status is None else (lambda j: j.status is status),
            limit=limit,
        )
        return [j.record() for j in jobs], more

    def list(self, owner: str, status: JobStatus | None = None, since: float | None = None) -> list[JobRecord]:
        """Every job this identity may see, oldest first (the library's form; the API pages with list_page)."""
        records: list[JobRecord] = []
        more = True
        while more:
            after = (records[-1].started_at, records[-1].id) if records else None
            page, more = self.list_page(owner, status, since, after=after, limit=LIST_PAGE_MAX)
            records += page
        return records

    # -- lifecycle --------------------------------------------------------------------------------------------------

    async def start(
        self,
        owner: str,
        argv: Iterable[bytes | str],
        limits: Limits | None = None,
        *,
        env: Mapping[str, bytes | str] | None = None,
        workdir: str | None = None,
        timeout: float | None = None,
    ) -> JobRecord:
        """Start argv (no shell) in fresh groups with limits; fails with InvalidArgumentError if it cannot exec.

        env is added to the job's clean environment; workdir (absolute) replaces its fresh working directory;
        timeout (seconds) stops the job, reason "timeout", when it runs longer.
        """
        if self._closed:
            raise UnavailableError("the server is shutting down")
        spec = validate_spec(argv, limits, env, workdir, timeout, self.config)
        self._check_disk()
        # The slot is taken before the first await and given back on every way out but success; a check here and
        # a count after the spawn let hundreds of Starts through.
        self._running.take(owner)
        launch = asyncio.get_running_loop().create_task(self._start_tracked(owner, spec))
        self._launching.add(launch)
        launch.add_done_callback(self._launching.discard)
        # From the slot on, a Start completes or undoes itself whatever its caller does: cut short by a cancelled
        # call or a reset connection, a launch left processes no record knew of, or records List did not show.
        # A caller that goes away leaves its job simply running (like `docker run -d` whose client vanished).
        try:
            return await asyncio.shield(launch)
        except asyncio.CancelledError:
            launch.add_done_callback(functools.partial(_log_orphaned_start, owner))
            raise

    async def _start_tracked(self, owner: str, spec: JobSpec) -> JobRecord:
        """Launch, then track: the job is in List, stoppable and counted from the moment its record is on disk."""
        try:
            job, user, record = await self._launch(owner, spec)
        except BaseException:
            self._running.give_back(owner)
            raise
        self._add(job)
        self._users[job.id] = user
        task = asyncio.get_running_loop().create_task(self._on_end(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return record

    async def _launch(self, owner: str, spec: JobSpec) -> tuple[Job, JobUser, JobRecord]:
        """Make the job's directories and groups, spawn it and write its record; on failure undo all of it.

        Each step pushes its undo as it succeeds, so a failure undoes exactly what was done, newest first: the
        pipes, the job's own end record, the output log, the groups (emptied), the working directory (made root's),
        the state-dir entry and directories (removed in the writer's threads), the uid.
        """
        job_id = self._new_id()
        async with contextlib.AsyncExitStack() as undo:
            lodging = self._lodge(job_id, undo)
            group = self._driver.create(job_id, spec.limits)
            undo.push_async_callback(_discard_group, group)
            with _state_dir_full():
                max_out = self.config.max_output_bytes
                output = OutputLog(self._store.output_dir(job_id), segment_size_for(max_out), max_out)
                undo.callback(output.close)
                job = self._new_job(job_id, owner, spec, lodging, group, output)
                undo.callback(job.abandon)
                record = await self._spawn(job, spec, self._request(spec, lodging, group), undo)
            undo.pop_all()
        self._recorded.pop(job_id, None)
        return job, lodging.user, record

    def _lodge(self, job_id: str, undo: contextlib.AsyncExitStack) -> Lodging:
        """A uid for the job and its directories, each given back by undo."""
        user = self._uids.acquire()
        undo.callback(self._uids.release, user)
        # after the groups are emptied: its state-dir entry and directories go in the writer's threads (a
        # tombstone after any record queued for it, so nothing of it comes back), the workdir root's at once
        # (the uid may run the next job before the removal is done)
        undo.push_async_callback(self._unrecord, job_id)
        undo.callback(self._work.retire, job_id)
        home = self._work.make_workdir(job_id, user.uid, user.gid)
        private = self._work.make_private(job_id) if self.config.private_tmp else None
        return Lodging(user, home, private)

    def _request(self, spec: JobSpec, lodging: Lodging, group: JobGroup) -> SpawnRequest:
        return SpawnRequest(
            argv=spec.argv,
            env={**BASE_ENV, b"HOME": os.fsencode(lodging.home), **spec.env},
            cwd=os.fsencode(spec.workdir or lodging.home),
            join_files=group.join_files,
            uid=lodging.user.uid,
            gid=lodging.user.gid,
            umask=JOB_UMASK,
            private_dirs=lodging.private,
        )

    def _new_job(
        self, job_id: str, owner: str, spec: JobSpec, lodging: Lodging, group: JobGroup, output: OutputLog
    ) -> Job:
        return Job(
            job_id,
            owner,
            spec.argv,
            spec.limits,
            group,
            output,
            self._clock,
            uid=lodging.user.uid,
            persist=self._save_async,
            workdir=spec.workdir or str(lodging.home),
            timeout=spec.timeout,
            timeout_grace=self.config.default_grace,
            budget=self._budget(owner),
        )

    async def _spawn(
        self, job: Job, spec: JobSpec, request: SpawnRequest, undo: contextlib.AsyncExitStack
    ) -> JobRecord:
        """Start the job's process on two fresh pipes (the job takes their read ends, the process the write ends)
        and write its record; returns the record once it is durable and the process has exec'd.

        The record is queued as soon as the process exists, so that its fdatasync overlaps the child's setup
        (groups, namespaces, mounts, exec); a spawn that fails after it is undone by the tombstone queued behind
        it, and a record the disk refuses undoes the started process (its groups are emptied)."""
        out_r, out_w = pipe()
        undo.enter_context(out_r)
        undo.enter_context(out_w)
        err_r, err_w = pipe()
        undo.enter_context(err_r)
        undo.enter_context(err_w)
        spawner = self._live_spawner()
        written: asyncio.Future[None] | None = None
        first: JobRecord | None = None

        def forked(pid: int) -> None:
            nonlocal written, first
            job.pid = pid
            first = job.record(usage=NO_USAGE)
            written = self._records.queue(first)
            written.add_done_callback(_retrieved)  # awaited below, unless the Start fails before that
            self._recorded[job.id] = written

        with out_w, err_w:  # the process has its own copies now: its end is the pipes' EOF
            try:
                pid, exit_status = await spawner.spawn(request, out_w, err_w, forked)
            except SpawnError as e:
                raise _spawn_error(spec.argv[0], e, spec.workdir) from None
        job.attach(pid, exit_status, out_r.fileno(), err_r.fileno())
        out_r.detach()  # the job's now: it closes them at EOF
        err_r.detach()
        if written is None or first is None:  # a spawner that does not tell the fork
            first = job.record(usage=NO_USAGE)
            written = self._records.queue(first)
            self._recorded[job.id] = written
        await written  # acknowledged only once it is on disk
        return first

    async def _unrecord(self, job_id: str) -> None:
        """A failed Start's record undone: a tombstone; when its start record was queued, the failure is answered
        only once the tombstone is durable (else a crash could bring back a job its client was told did not
        start)."""
        written = self._recorded.pop(job_id, None)
        if written is not None:
            await asyncio.wait([written])  # a record the disk refused needs no durable undo (nor a full disk's wait)
        if written is None or written.cancelled() or written.exception() is not None:
            self._records.remove(job_id)
            return
        try:
            await self._records.remove_durably(job_id)
        except Exception:  # the Start's own error is the one to answer; this one is the log's
            log.exception("job %s: the tombstone of a failed Start was not written", job_id)

    def _live_spawner(self) -> Spawner:
        if not self._spawner.alive:
            # Its jobs lost their parent (they are being killed); new jobs get a new helper.
            log.error("the spawn helper died; starting a new one")
            self._spawner.close()
            self._spawner = self._spawner.launch()
        return self._spawner

    async def _on_end(self, job: Job) -> None:
        await job.wait()
        self._live.pop(job.id, None)
        self._ended.add(job)  # retention's turn from now on
        # The group is empty, so no process holds the uid any more; nothing it left may stay reachable by it.
        self._work.retire(job.id)
        self._uids.release(self._users.pop(job.id))
        self._running.give_back(job.owner)
        # in a thread: on a filesystem mounted with `discard` each rmdir waits for its block's discard (0.2 ms)
        await asyncio.to_thread(self._drop_private, job.id)

    def _drop_private(self, job_id: str) -> None:
        if not self._work.clear_private(job_id):
            self._work.remove_private(job_id)

    async def settled(self) -> None:
        """Until every record write and job removal asked for so far is done (they run in the writer's threads)."""
        await self._records.settled()

    async def _save_async(self, record: JobRecord) -> None:
        """A job's final record: if the disk refuses it, it is kept and retried (the janitor) rather than fail."""
        await self._records.persist(record)

    def _latest(self, record: JobRecord) -> JobRecord:
        """What a kept record's retry writes: the job's record now if it has ended, else the one kept."""
        job = self._jobs.get(record.id)
        return job.record() if job is not None and job.ended else record

    def _delete_files(self, job_id: str) -> None:
        """A removed job's files: its state directory (record and output) and working directory (the writer's
        second thread calls it: they may hold many files)."""
        self._store.remove(job_id)
        self._work.remove(job_id)

    async def stop(self, owner: str, job_id: str, grace: float | None = None, sig: int | None = None) -> JobRecord:
        """Stop the whole job (sig, default SIGTERM; SIGKILL after grace); an ended job comes back unchanged."""
        if grace is not None and not (0 <= grace <= 3600):
            raise InvalidArgumentError(f"grace must be between 0 and 3600 seconds, got {grace}")
        if sig is not None and not 1 <= sig < signal.NSIG:
            raise InvalidArgumentError(f"signal must be a signal number between 1 and {signal.NSIG - 1}, got {sig}")
        job = self._resolve(owner, job_id)
        if job.ended:
            return job.record()
        g = self.config.default_grace if grace is None else grace
        return await job.stop(g, sig=signal.SIGTERM if sig is None else sig)

    async def wait(self, owner: str, job_id: str) -> JobRecord:
        """Block until the job has ended; its final record."""
        return await self._resolve(owner, job_id).wait()

    def stream(
        self,
        owner: str,
        job_id: str,
        from_offset: int = 0,
        *,
        follow: bool = True,
        only: int | None = None,
        tail_lines: int | None = None,
        since_ms: int | None = None,
    ) -> AsyncIterator[Chunk]:
        """The job's output from from_offset, then live until it has ended and everything was delivered.

        follow=False ends at what exists now; only=STDOUT/STDERR filters on the server; tail_lines starts at the
        last N lines instead of from_offset; since_ms (Unix time in ms) at the first byte read at or after it
        (with tail_lines: whichever starts later, as `docker logs --since --tail` does).
        """
        if from_offset < 0:
            raise InvalidArgumentError(f"from_offset must not be negative, got {from_offset}")
        if tail_lines is not None and tail_lines < 0:
            raise InvalidArgumentError(f"tail must not be negative, got {tail_lines}")
        job = self._resolve(owner, job_id)
        if tail_lines is not None:
            from_offset = job.output.tail_offset(tail_lines, only)
        if since_ms is not None:
            from_offset = max(from_offset, job.output.offset_since(since_ms))
        return self._counted_stream(owner, job.output, from_offset, follow, only)

    def _chunk_size(self) -> int:
        return chunk_size_for(self._streams.total)

    async def _counted_stream(
        self, owner: str, output: OutputLog, from_offset: int, follow: bool, only: int | None
    ) -> AsyncIterator[Chunk]:
        # The quota is taken here, as the first step of the stream and with no await before it, so that the check
        # and the count are one step and the slot is only ever held inside the try that gives it back.
        self._streams.take(owner)
        chunks = output.follow(from_offset, follow, only, self._chunk_size)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self._streams.give_back(owner)  # before the await below: a second cancellation cannot skip it
            self._trim_due = self._trim_due or self._streams.total == 0
            await chunks.aclose()  # type: ignore[attr-defined]

    # -- storage ----------------------------------------------------------------------------------------------------

    def _check_disk(self) -> None:
        try:
            st = os.statvfs(self._store.root)
        except OSError:
            return
        if st.f_bavail * st.f_frsize < self.config.min_free_bytes:
            raise ResourceExhaustedError("the server's state directory is full; no new jobs until space returns")

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.janitor_interval)
            try:
                self.collect_garbage()
            except Exception:
                log.exception("janitor failed")
            if self._trim_due and self._streams.total == 0:
                self._trim_due = False
                release_free_heap()

    def collect_garbage(self) -> None:
        """Retry unsaved records; apply retention (per-user count, age, total output), oldest ended jobs first."""
        self._records.retry(self._latest)
        cfg = self.config
        live = [j for j in self._live.values() if not j.ended]
        live_bytes = sum(j.output_bytes for j in live)
        excess = {owner: b.excess for owner, b in self._budgets.items() if b.over}
        doomed = self._ended.select(self._policy, self._clock(), live_bytes, excess)
        if cfg.max_total_output_bytes is not None:
            total = self._ended.total_bytes + live_bytes - sum(j.output_bytes for j in doomed)
            while total > cfg.max_total_output_bytes:  # only running jobs are left: drop their oldest output
                heaviest = max(live, key=lambda j: j.output_bytes, default=None)
                dropped = heaviest.output.drop_oldest_segment() if heaviest is not None else 0
                if not dropped or heaviest is None:
                    break
                self._budget(heaviest.owner).used -= dropped
                total -= dropped
        for j in doomed:
            if j.output.readers == 0:  # a job being streamed is removed on a later round
                self._remove(j)

    def _remove(self, job: Job) -> None:
        """Forget an ended job: its record, output and working directory."""
        self._jobs.remove(job)
        self._ended.discard(job)
        self._budget(job.owner).used -= job.output_bytes
        job.output.close()
        self._records.remove(job.id)  # its record, output and working directory go in the writer's threads

    # -- helpers ----------------------------------------------------------------------------------------------------

    async def shutdown(self, grace: float | None = None, reason: str = "server shutting down") -> tuple[str, ...]:
        """Stop every running job and the spawn helper; remove this instance's groups.

        Returns the ids of jobs whose latest record could not be written (each one logged): after a restart they
        show what their last written record said, so the caller must not report a clean exit.
        """
        self._closed = True
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        # Starts in flight finish (or undo themselves) first, so that their jobs are stopped with the rest.
        await asyncio.gather(*self._launching, return_exceptions=True)
        g = self.config.default_grace if grace is None else grace
        running = [j for j in self._jobs if not j.ended]
        await asyncio.gather(*(j.stop(g, reason) for j in running), return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # The last chance to write what a full disk refused (the janitor retried it, this is its final round),
        # then the writer's threads end: the loop waits for their fsyncs and joins without doing them.
        await self._records.finish(self._latest)
        unsaved = self._records.unsaved
        for record in unsaved.values():
            log.error(
                "job %s: final record NOT written (%s): it %s; after a restart it shows as its last written record "
                "says",
                record.id,
                self._records.unsaved_why.get(record.id, "unknown error"),
                _outcome(record),
            )
        self.close()
        return tuple(unsaved)

    def close(self) -> None:
        """Let go of the spawn helper, this instance's parent groups if they are empty, and the state dir, touching
        no job or job group (also for an engine that never reconciled: a server that could not bind leaves a crashed
        predecessor's jobs and groups as it found them, and no empty groups of its own)."""
        self._records.close()
        self._spawner.close()
        _remove_empty_instance(self._driver)
        self._store.close()


def _remove_empty_instance(driver: CgroupDriver) -> None:
    """This instance's parent groups, if they are empty: the kernel refuses (EBUSY) while a job group is in them."""
    with contextlib.suppress(OSError):
        driver.remove_instance()


def _log_orphaned_start(owner: str, launch: asyncio.Task[JobRecord]) -> None:
    """The end of a Start whose caller went away: its outcome reaches the log (and the exception is retrieved)."""
    if launch.cancelled():
        return
    e = launch.exception()
    if e is None:
        log.info("job %s of %s started; its Start call had already ended", launch.result().id, owner)
    else:
        log.info("a Start of %s whose call had ended failed: %s", owner, e)


def _outcome(record: JobRecord) -> str:
    """'finished (exit 7)', 'stopped (server shutting down), signal 15': what the lost record would have said."""
    text = record.status.value
    if record.reason:
        text += f" ({record.reason})"
    if record.status.ended:
        how = f"exit {record.exit_code}" if record.signal is None else f"signal {record.signal}"
        text = f"{text}, {how}" if record.reason else f"{text} ({how})"
    return text


def user_share(config: EngineConfig, state_dir: Path) -> int | None:
    """How much output one user may keep: the configured share, or a quarter of the smaller of the total cap and
    the state dir's disk (so that one user's jobs leave three quarters of it to the others)."""
    if config.max_output_per_user is not None:
        return config.max_output_per_user
    caps = [c for c in (config.max_total_output_bytes,) if c is not None]
    with contextlib.suppress(OSError):
        st = os.statvfs(state_dir)
        caps.append(st.f_blocks * st.f_frsize)
    return min(caps) // 4 if caps else None


# a job's record as its process is forked: nothing is used yet (reading its groups cost four file reads per Start)
NO_USAGE = Usage(cpu_seconds=0.0, cpu_throttled_periods=0, memory_peak_bytes=0, io_read_bytes=0, io_write_bytes=0)


def _retrieved(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


async def _discard_group(group: JobGroup) -> None:
    """Empty the job's groups (SIGKILL) and remove them."""
    await group.kill()
    await group.destroy()


@contextlib.contextmanager
def _state_dir_full() -> Iterator[None]:
    """The state dir's disk refusing (ENOSPC, EDQUOT) is the client's ResourceExhaustedError."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhaustedError(
                "the server's state directory is full; no new jobs until space returns"
            ) from None
        raise


def _spawn_error(name: bytes, e: SpawnError, workdir: str | None) -> Exception:
    shown = name.decode("utf-8", "backslashreplace")
    if e.stage == "cwd":
        return InvalidArgumentError(f"cannot enter working directory {workdir!r} as the job's user: {e.strerror}")
    if e.stage in ("exec", "user"):
        return InvalidArgumentError(f"cannot execute {shown!r}: {e.strerror}")
    if e.stage == "request":
        return InvalidArgumentError(f"cannot start {shown!r}: {e.detail or e.strerror}")
    return RuntimeError(f"starting {shown!r} failed at {e.stage}: {e.strerror}")
