"""RecordWriter: the one thread that writes job records (group commit) and removes jobs' files, off the event loop.

Every Start waits for its record to be durable, and an fsync costs a journal commit (0.4-6 ms here, 100-300 ms
behind a job writing gigabytes), so the records are written in batches: whatever is queued when the thread wakes
goes to the journal in one append and one fdatasync, and every caller of the batch is answered then. Measured on
this host's ext4 (batches of 1/8/32 records, ms): one atomic file each 0.8/22/79, per-record files + one syncfs
7.9/11/47 (and 16-104 beside a writer of dirty pages, which syncfs flushes too), one journal append + fdatasync
0.6/2.6/0.4 (4-6 beside the writer).

Order is the queue's: a removal queued after a save wins (its tombstone follows the record in the journal), and
a save of a job already removed is dropped, so a late write cannot bring a job back at restart. A job's files
(its state directory with the output, its working directory) are deleted only once its tombstone is durable, by
a second thread, so that a removal of 100k files delays neither the loop nor the next commit. That thread takes
every removal queued to it at once and makes them durable with one fsync of the jobs dir; until then their
tombstones stay in the journal (compaction keeps them), so a crash cannot bring a removed job back from its
record.json. The journal is compacted in that thread too, beside the commits (jobsvc/store.py).

A record the disk refused (full) is kept, and retried when the janitor asks; Get shows the job's state meanwhile,
and the shutdown reports what was never written.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from jobsvc.model import JobRecord
from jobsvc.store import Entry, JobStore, record_entry, record_json, removal_entry

log = logging.getLogger(__name__)

COMPACT_AT = 4 << 20  # journal bytes past which it is rewritten (and at least twice what it held after the last)
REMEMBER_REMOVED = 1 << 16  # removed ids whose late saves are still dropped


@dataclass
class _Op:
    record: JobRecord | None  # None: a removal
    job_id: str
    done: Callable[[BaseException | None], None] = field(default=lambda e: None)


class RecordWriter:
    """Writes records in batches from one thread; removes jobs' files from another."""

    def __init__(self, store: JobStore, delete: Callable[[str], None]) -> None:
        self._store = store
        self._delete = delete  # a job's files besides its record: output, working directory
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._commit_lock = threading.Lock()  # one batch at a time, from the thread or a closing caller
        self._removed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._deleting: set[str] = set()  # tombstones whose files are not gone (durably) yet
        self._to_delete: list[str] = []  # of those, the ones the deleter has not taken yet
        self._deleting_lock = threading.Lock()
        self._deferred: list[_Op] = []  # removals whose tombstone a full disk refused
        self._compact_at = COMPACT_AT
        self._compacting = False  # a compaction is queued or running in the deleter's thread
        self._thread: threading.Thread | None = None
        self._closed = False
        self._deleter = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobsvc-remove")
        self.unsaved: dict[str, JobRecord] = {}  # the loop's: records the disk refused, by job id
        self.unsaved_why: dict[str, str] = {}
        self.batches = 0  # how many commits (for tests and the bench)

    # -- the loop's side ------------------------------------------------------------------------------------------

    def open(self, records: Iterable[JobRecord], removed: Iterable[str] = ()) -> None:
        """Start from what a restart loaded: the journal is rewritten to exactly these records (and the tombstones
        of removed jobs whose files are still there), then the thread starts."""
        size = self._store.rewrite(records, removed)
        self._compact_at = max(COMPACT_AT, 2 * size)
        self._thread = threading.Thread(target=self._run, name="jobsvc-records", daemon=True)
        self._thread.start()

    async def save(self, record: JobRecord) -> None:
        """Return once the record is durable; raise the OSError that refused it."""
        await self.queue(record)

    def queue(self, record: JobRecord) -> asyncio.Future[None]:
        """save(), queued now (before anything the caller queues next): a future of its durability."""
        return asyncio.wrap_future(self._submit(record))

    async def persist(self, record: JobRecord) -> None:
        """save(), but a record the disk refused is kept for the janitor's retry instead of failing the caller."""
        try:
            await self.save(record)
        except OSError as e:
            self._keep(record, e)
        else:
            self._saved(record.id)

    async def persist_all(self, records: Iterable[JobRecord]) -> None:
        """persist() for many records at once: all queued before the first is waited for, so that they share
        commits (a restart's take-over of the jobs the last server left running)."""
        queued = [(record, self._submit(record)) for record in records]
        for record, written in queued:
            try:
                await asyncio.wrap_future(written)
            except OSError as e:
                self._keep(record, e)
            else:
                self._saved(record.id)

    def retry(self, latest: Callable[[JobRecord], JobRecord]) -> None:
        """Queue every kept record again, as latest(record) has it now (the janitor's round).

        The writes happen in the thread; their outcome is booked on the loop when each lands."""
        loop = asyncio.get_running_loop()
        if self._deferred:
            self._put(_Op(None, ""))
        for record in list(self.unsaved.values()):
            current = latest(record)
            written = self._submit(current)
            written.add_done_callback(functools.partial(self._book_soon, loop, current))

    async def finish(self, latest: Callable[[JobRecord], JobRecord]) -> None:
        """The shutdown's end: a last try at every kept record (as latest(record) has it), then close(); the
        loop waits for the threads, their fsyncs and the joins without doing them."""
        if self._deferred:
            self._put(_Op(None, ""))
        await self.persist_all([latest(record) for record in self.unsaved.values()])
        await asyncio.to_thread(self.close)

    def remove(self, job_id: str) -> None:
        """Forget a job: its record (a tombstone after any save queued before), then its files, in the threads."""
        self.unsaved.pop(job_id, None)
        self.unsaved_why.pop(job_id, None)
        self._put(_Op(None, job_id))

    async def remove_durably(self, job_id: str) -> None:
        """remove(), returning once the tombstone is durable (one a full disk refused: once its retry lands)."""
        self.unsaved.pop(job_id, None)
        self.unsaved_why.pop(job_id, None)
        durable: concurrent.futures.Future[None] = concurrent.futures.Future()

        def done(e: BaseException | None) -> None:
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # its waiter was cancelled
                durable.set_result(None)

        self._put(_Op(None, job_id, done))
        await asyncio.wrap_future(durable)

    async def settled(self) -> None:
        """Until everything queued before is written and the files of every removal queued before are gone."""
        written: concurrent.futures.Future[None] = concurrent.futures.Future()

        def done(e: BaseException | None) -> None:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                if e is None:
                    written.set_result(None)
                else:
                    written.set_exception(e)

        self._put(_Op(None, "", done))
        await asyncio.wrap_future(written)
        if self._thread is not None:  # the removals' deletions were handed to it before the barrier was answered
            await asyncio.wrap_future(self._deleter.submit(lambda: None))

    def close(self) -> None:
        """Write what is queued, stop both threads (their work done); later saves are written by the caller.
        Once is enough: closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()
        self._deleter.shutdown(wait=True)

    # -- bookkeeping (on the loop) ----------------------------------------------------------------------------------

    def _keep(self, record: JobRecord, e: OSError) -> None:
        if record.id in self._removed:
            return
        if record.id not in self.unsaved:
            log.error("job %s: cannot save its record (%s); will retry", record.id, e.strerror)
        self.unsaved[record.id] = record
        self.unsaved_why[record.id] = e.strerror or type(e).__name__

    def _saved(self, job_id: str) -> None:
        self.unsaved.pop(job_id, None)
        self.unsaved_why.pop(job_id, None)

    def _book_soon(
        self, loop: asyncio.AbstractEventLoop, record: JobRecord, written: concurrent.futures.Future[None]
    ) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody to book it for
            loop.call_soon_threadsafe(self._booked, record, written)

    def _booked(self, record: JobRecord, written: concurrent.futures.Future[None]) -> None:
        e = written.exception()
        if isinstance(e, OSError):
            self._keep(record, e)
        elif e is None:
            self._saved(record.id)
        else:
            log.error("job %s: saving its record failed: %r", record.id, e)

    # -- the queue --------------------------------------------------------------------------------------------------

    def _submit(self, record: JobRecord) -> concurrent.futures.Future[None]:
        result: concurrent.futures.Future[None] = concurrent.futures.Future()

        def done(e: BaseException | None) -> None:
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # its waiter was cancelled
                if e is None:
                    result.set_result(None)
                else:
                    result.set_exception(e)

        self._put(_Op(record, record.id, done))
        return result

    def _put(self, op: _Op) -> None:
        if self._thread is not None:
            self._queue.put(op)
        else:  # not open yet, or closed: the caller writes
            with self._commit_lock:
                self._commit([op])
            if not op.job_id:  # a nudge or a barrier: answered once its batch is done
                op.done(None)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self._queue.get_nowait())
            stop = None in batch
            ops = [op for op in batch if op is not None]
            with self._commit_lock:
                try:
                    self._commit(ops)
                except BaseException as e:  # never leave a caller waiting
                    log.exception("the record writer failed")
                    for op in ops:
                        with contextlib.suppress(concurrent.futures.InvalidStateError):
                            op.done(e)
                else:
                    for op in ops:
                        if not op.job_id:  # a nudge or a barrier: answered once its batch is done
                            op.done(None)
            if stop:
                return

    # -- the thread's side ------------------------------------------------------------------------------------------

    def _commit(self, ops: list[_Op]) -> None:
        """One batch: stage each ended job's mirror, one journal append + fdatasync, publish the mirrors, answer."""
        batch = _Batch()
        for op in [*self._deferred, *ops]:
            self._add(batch, op)
        self._deferred = []
        try:
            if batch.entries:
                self._store.commit(batch.entries)
                self.batches += 1
        except OSError as e:
            for tmp in batch.staged.values():
                self._store.unstage(tmp)
            # a removal is never refused, only deferred to the next batch (or the janitor's retry)
            self._deferred = batch.removals
            batch.answer(e)
            return
        for tmp in batch.staged.values():
            with contextlib.suppress(OSError):  # the journal has it: only the mirror lags
                self._store.publish(tmp)
        batch.answer(None)
        for op in batch.removals:  # their tombstones are durable
            op.done(None)
        if batch.removed:
            with self._deleting_lock:
                self._deleting.update(batch.removed)
                self._to_delete += batch.removed
            if self._thread is not None:
                self._deleter.submit(self._delete_queued)
            else:  # closed: the caller deletes
                self._delete_queued()
        if self._thread is not None and not self._compacting and self._store.journal_size() > self._compact_at:
            self._compacting = True
            self._deleter.submit(self._compact)

    def _add(self, batch: _Batch, op: _Op) -> None:
        if not op.job_id:  # a nudge: only the deferred removals
            return
        if op.record is None:
            tmp = batch.staged.pop(op.job_id, None)
            if tmp is not None:
                self._store.unstage(tmp)
            batch.removed.append(op.job_id)
            batch.removals.append(op)
            self._forget(op.job_id)
            batch.entries.append(removal_entry(op.job_id))
        elif op.job_id in self._removed:
            batch.dropped.append(op)  # a late save of a removed job: it must not bring the job back
        else:
            payload = record_json(op.record)  # once, for the mirror and the journal line
            try:
                tmp = self._store.stage(op.record, payload)
            except OSError as e:
                batch.refused.append((op, e))
                return
            if tmp is not None:
                batch.staged[op.job_id] = tmp
            batch.entries.append(record_entry(op.record, payload))
            batch.waiting.append(op)

    def _forget(self, job_id: str) -> None:
        self._removed[job_id] = None
        while len(self._removed) > REMEMBER_REMOVED:
            self._removed.popitem(last=False)

    def _delete_queued(self) -> None:
        """Delete the files of every removal queued so far (the deleter's thread), then make it durable with one
        fsync of the jobs dir. A call that finds nothing left had its removals taken by an earlier one."""
        with self._deleting_lock:
            job_ids, self._to_delete = self._to_delete, []
        if not job_ids:
            return
        for job_id in job_ids:
            try:
                self._delete(job_id)
            except Exception:
                log.exception("job %s: removing its files failed", job_id)
        with contextlib.suppress(OSError):
            self._store.sync_jobs_dir()
        with self._deleting_lock:  # from now on compaction may drop their tombstones
            self._deleting.difference_update(job_ids)

    def _still_deleting(self) -> set[str]:
        with self._deleting_lock:
            return set(self._deleting)

    def _compact(self) -> None:
        """In the deleter's thread, beside the commits (which it holds only to copy their last entries)."""
        try:
            size = self._store.compact(self._still_deleting, self._commit_lock)
        except OSError as e:
            log.warning("cannot compact the record journal (%s); it grows until the next try", e.strerror)
            self._compact_at = 2 * self._compact_at
        except Exception:
            log.exception("compacting the record journal failed")
            self._compact_at = 2 * self._compact_at
        else:
            self._compact_at = max(COMPACT_AT, 2 * size)
        finally:
            self._compacting = False


@dataclass
class _Batch:
    entries: list[Entry] = field(default_factory=list)
    staged: dict[str, str] = field(default_factory=dict)  # job id -> the temp file of its last record
    waiting: list[_Op] = field(default_factory=list)  # saves in the journal append
    refused: list[tuple[_Op, OSError]] = field(default_factory=list)  # their mirror could not be written
    dropped: list[_Op] = field(default_factory=list)  # saves of removed jobs
    removed: list[str] = field(default_factory=list)
    removals: list[_Op] = field(default_factory=list)  # the tombstones' ops, answered once they are durable

    def answer(self, e: OSError | None) -> None:
        for op in self.waiting:
            op.done(e)
        for op in self.dropped:
            op.done(None)
        for op, err in self.refused:
            op.done(err)
