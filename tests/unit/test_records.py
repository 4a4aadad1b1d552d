"""RecordWriter: group commit, the full-disk retry, removal off the loop, order, and what a restart reads."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import errno
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path

import pytest

from jobsvc.model import JobRecord
from jobsvc.records import RecordWriter
from jobsvc.states import JobStatus
from jobsvc.store import JOURNAL, Entry, JobStore, journal_line, read_journal
from jobsvc.store import record_to_json as store_json

T0 = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)


def record(n: int, status: JobStatus = JobStatus.RUNNING) -> JobRecord:
    return JobRecord(
        id=f"00000000-0000-4000-8000-{n:012d}",
        owner="CN=alice",
        command=(b"sleep", b"100"),
        status=status,
        started_at=T0,
        exit_code=0 if status is JobStatus.FINISHED else None,
        ended_at=T0 if status.ended else None,
    )


class GatedStore(JobStore):
    """The real store, whose commits can be held (a slow disk), refused (a full disk) and counted."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir, durable=False)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.full = False
        self.refuse_commits = False  # the journal's disk full (full: the record files')
        self.commits: list[list[Entry]] = []

    def stage(self, record: JobRecord, payload: bytes) -> str | None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().stage(record, payload)

    def commit(self, entries: Sequence[Entry]) -> None:
        self.entered.set()
        self.gate.wait(10)
        if self.refuse_commits:
            raise OSError(errno.ENOSPC, "No space left on device")
        batch = list(entries)
        self.commits.append(batch)
        super().commit(batch)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[GatedStore]:
    s = GatedStore(tmp_path / "state")
    yield s
    s.close()


def reload(store: JobStore) -> tuple[dict[str, JobRecord], list[tuple[str, str]]]:
    """What a restart would read: a new store on the same state dir."""
    store.close()
    again = JobStore(store.root, durable=False)
    try:
        records, skipped = again.load_all()
    finally:
        again.close()
    return {r.id: r for r in records}, skipped


def opened(store: JobStore, deleted: list[tuple[str, int]] | None = None) -> RecordWriter:
    def delete(job_id: str) -> None:
        store.remove(job_id)
        if deleted is not None:
            deleted.append((job_id, threading.get_ident()))

    writer = RecordWriter(store, delete)
    writer.open([])
    return writer


async def test_records_queued_while_a_commit_runs_share_the_next_one(store: GatedStore) -> None:
    writer = opened(store)
    store.gate.clear()
    first = asyncio.ensure_future(writer.save(record(0)))
    while not store.entered.is_set():  # the first commit is under way (held)
        await asyncio.sleep(0.001)
    rest = [asyncio.ensure_future(writer.save(record(n))) for n in range(1, 6)]
    await asyncio.sleep(0.05)
    assert not first.done() and not any(f.done() for f in rest), "answered before the record was durable"
    store.gate.set()
    await asyncio.gather(first, *rest)
    writer.close()
    assert [len(c) for c in store.commits] == [1, 5]
    assert writer.batches == 2
    records, _ = reload(store)
    assert set(records) == {record(n).id for n in range(6)}


async def test_a_record_the_disk_refused_is_kept_and_written_by_the_retry(store: GatedStore) -> None:
    writer = opened(store)
    await writer.save(record(1))
    store.full = True
    final = record(1, JobStatus.FINISHED)
    await writer.persist(final)  # does not raise: kept for the janitor
    assert writer.unsaved == {final.id: final} and writer.unsaved_why[final.id] == "No space left on device"
    writer.retry(lambda r: r)
    await asyncio.sleep(0.05)
    assert final.id in writer.unsaved, "still full: still kept"
    store.full = False
    writer.retry(lambda r: r)
    for _ in range(500):
        if not writer.unsaved:
            break
        await asyncio.sleep(0.01)
    assert writer.unsaved == {} and writer.unsaved_why == {}
    writer.close()
    records, _ = reload(store)
    assert records[final.id].status is JobStatus.FINISHED


async def test_a_durable_removal_returns_only_once_a_tombstone_the_disk_refused_is_written(
    store: GatedStore,
) -> None:
    writer = opened(store)
    job = record(1)
    await writer.save(job)
    store.refuse_commits = True
    removal = asyncio.ensure_future(writer.remove_durably(job.id))
    await asyncio.sleep(0.1)
    assert not removal.done()  # deferred to a later batch, not durable
    store.refuse_commits = False
    writer.retry(lambda r: r)  # the janitor's round: the deferred tombstone goes in its batch
    await asyncio.wait_for(removal, 10)
    writer.close()
    records, _ = reload(store)
    assert job.id not in records


async def test_a_save_the_disk_refuses_raises_and_the_restart_keeps_the_last_written(store: GatedStore) -> None:
    writer = opened(store)
    await writer.save(record(2))
    store.full = True
    with pytest.raises(OSError) as err:
        await writer.save(record(2, JobStatus.FINISHED))
    assert err.value.errno == errno.ENOSPC
    writer.close()
    records, _ = reload(store)
    assert records[record(2).id].status is JobStatus.RUNNING


async def test_removal_runs_off_the_loop_and_the_loop_answers_while_it_blocks(store: GatedStore) -> None:
    release = threading.Event()
    deleting = threading.Event()
    threads: list[int] = []

    def slow_delete(job_id: str) -> None:  # a working directory of 100k files
        threads.append(threading.get_ident())
        deleting.set()
        release.wait(10)
        store.remove(job_id)

    writer = RecordWriter(store, slow_delete)
    writer.open([])
    await writer.save(record(3))
    writer.remove(record(3).id)
    while not deleting.is_set():
        await asyncio.sleep(0.001)
    await writer.save(record(4))  # the loop, and the next commit, go on while the removal blocks
    release.set()
    writer.close()
    assert threads and threading.get_ident() not in threads
    assert not store.job_dir(record(3).id).exists()
    records, _ = reload(store)
    assert set(records) == {record(4).id}


async def test_a_removal_after_a_save_wins(store: GatedStore) -> None:
    writer = opened(store)
    store.gate.clear()
    saving = asyncio.ensure_future(writer.save(record(5)))
    writer.remove(record(5).id)  # queued behind the save: in the same batch or the next
    store.gate.set()
    await saving
    writer.close()
    records, skipped = reload(store)
    assert record(5).id not in records
    assert not store.job_dir(record(5).id).exists()
    assert skipped == []


async def test_a_save_after_a_removal_does_not_bring_the_job_back(store: GatedStore) -> None:
    deleted: list[tuple[str, int]] = []
    writer = opened(store, deleted)
    await writer.save(record(6))
    writer.remove(record(6).id)
    await writer.save(record(6, JobStatus.FINISHED))  # a late write (a retry, a slow final record)
    writer.close()
    assert [job_id for job_id, _ in deleted] == [record(6).id]
    assert not store.job_dir(record(6).id).exists()
    records, _ = reload(store)
    assert records == {}


async def test_restart_reads_the_journal_over_stale_record_files(store: GatedStore) -> None:
    writer = opened(store)
    await writer.save(record(7))
    await writer.save(record(7, JobStatus.FINISHED))
    writer.close()
    stale = dataclasses.replace(record(7), reason="stale mirror")
    (store.job_dir(stale.id) / "record.json").write_text('{"not": "what the journal says"}')
    records, skipped = reload(store)
    assert records[stale.id].status is JobStatus.FINISHED and skipped == []


def test_a_torn_journal_tail_is_ignored_and_the_whole_entries_before_it_are_read() -> None:
    good = journal_line({"removed": "a"}) + journal_line({"removed": "b"})
    torn = journal_line({"removed": "c"})[:-5]
    last, size = read_journal(good + torn)
    assert last == {"a": None, "b": None} and size == len(good)
    flipped = bytearray(journal_line({"removed": "d"}))
    flipped[-3] ^= 1  # a byte changed: its CRC no longer matches
    assert read_journal(good + bytes(flipped) + good) == ({"a": None, "b": None}, len(good))


async def test_the_journal_is_compacted_to_one_entry_per_kept_job(
    store: GatedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("jobsvc.records.COMPACT_AT", 4096)
    writer = opened(store)
    for n in range(10):
        await writer.save(record(n))
        await writer.save(record(n, JobStatus.FINISHED))
    for n in range(5):
        writer.remove(record(n).id)
    await writer.save(record(99))
    writer.close()
    lines = (store.root / JOURNAL).read_bytes().count(b"\n")
    assert lines < 26, "26 entries were written: the journal was never compacted"
    records, _ = reload(store)
    assert set(records) == {record(n).id for n in (*range(5, 10), 99)}
    assert all(records[record(n).id].status is JobStatus.FINISHED for n in range(5, 10))


async def test_a_restart_writes_the_journal_again_only_when_it_is_not_one_entry_per_job_already(
    store: GatedStore,
) -> None:
    writer = opened(store)
    for n in range(3):
        await writer.save(record(n, JobStatus.FINISHED))
    writer.close()
    store.close()
    journal = store.root / JOURNAL

    def restart() -> int:
        again = JobStore(store.root, durable=False)
        try:
            records, _ = again.load_all()
            again.rewrite(records)
        finally:
            again.close()
        return journal.stat().st_ino

    first = restart()  # three entries for three jobs: as compact as rewrite() would make it
    assert restart() == first
    with journal.open("ab") as f:
        f.write(journal_line(store_json(record(1, JobStatus.FINISHED))))  # job 1 twice: not compact
    rewritten = restart()
    assert rewritten != first and journal.read_bytes().count(b"\n") == 3
    assert restart() == rewritten


def test_an_undecodable_journal_entry_is_one_unreadable_record_not_a_failed_restart(store: GatedStore) -> None:
    good, bad = store_json(record(1, JobStatus.FINISHED)), store_json(record(2, JobStatus.FINISHED))
    bad["status"] = "no such status"
    store.commit([Entry(good["id"], journal_line(good)), Entry(bad["id"], journal_line(bad))])
    for job_id in (good["id"], bad["id"]):
        store.job_dir(job_id).mkdir(parents=True)
    records, skipped = reload(store)
    assert list(records) == [good["id"]]
    assert [(name, why.split(":")[0]) for name, why in skipped] == [(bad["id"], "unreadable record")]


async def test_commits_go_on_while_the_journal_is_compacted_and_what_they_append_meanwhile_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copying, release = threading.Event(), threading.Event()

    class HeldCompaction(GatedStore):
        def compact(self, deleting: Callable[[], Collection[str]], lock: threading.Lock) -> int:
            def held() -> Collection[str]:  # asked in the middle of the copy
                copying.set()
                release.wait(30)
                return deleting()

            return super().compact(held, lock)

    monkeypatch.setattr("jobsvc.records.COMPACT_AT", 4096)
    store = HeldCompaction(tmp_path / "state")
    writer = opened(store)
    for n in range(8):  # jobs 0-3 running, then finished
        await writer.save(record(n % 4, JobStatus.FINISHED if n >= 4 else JobStatus.RUNNING))
    n = 8
    while not copying.is_set():  # enough superseded entries for a compaction to start
        await writer.save(record(1, JobStatus.FINISHED))
        n += 1
    for m in range(10, 14):  # answered while the copy is held: the commits do not wait for it
        await writer.save(record(m))
    writer.remove(record(0).id)
    await writer.save(record(14))
    assert not release.is_set()
    release.set()
    await writer.settled()
    writer.close()
    entries = (store.root / JOURNAL).read_bytes().count(b"\n")
    assert entries < n + 6, "not compacted"  # n saves, then 6 entries while the copy was held
    records, _ = reload(store)
    assert set(records) == {record(m).id for m in (1, 2, 3, 10, 11, 12, 13, 14)}
    assert all(records[record(m).id].status is JobStatus.FINISHED for m in (1, 2, 3))


async def test_removals_queued_together_are_made_durable_with_one_fsync(
    store: GatedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs: list[int] = []
    monkeypatch.setattr(store, "sync_jobs_dir", lambda: syncs.append(1))
    first_entered, release = threading.Event(), threading.Event()

    def delete(job_id: str) -> None:
        if job_id == record(0).id:  # the deleter is busy with this one while the others are removed
            first_entered.set()
            release.wait(30)
        store.remove(job_id)

    writer = RecordWriter(store, delete)
    writer.open([])
    for n in range(10):
        await writer.save(record(n, JobStatus.FINISHED))
    writer.remove(record(0).id)
    await asyncio.get_running_loop().run_in_executor(None, first_entered.wait)
    for n in range(1, 10):
        writer.remove(record(n).id)
    await writer.save(record(99))  # behind the removals in the queue: their tombstones are durable now
    last, _ = read_journal((store.root / JOURNAL).read_bytes())
    assert all(last[record(n).id] is None for n in range(10))  # a crash now: none of them comes back
    release.set()
    await writer.settled()
    writer.close()
    assert len(syncs) == 2  # one for the first removal, one for the nine queued behind it
    assert not any(store.job_dir(record(n).id).exists() for n in range(10))
    records, _ = reload(store)
    assert set(records) == {record(99).id}


async def test_the_shutdowns_last_round_writes_off_the_loop(store: GatedStore) -> None:
    writer = opened(store)
    await writer.save(record(1))
    store.full = True
    final = record(1, JobStatus.FINISHED)
    await writer.persist(final)
    assert final.id in writer.unsaved
    store.full = False
    store.entered.clear()
    store.gate.clear()  # the disk is slow: the last round's commit is held
    finishing = asyncio.ensure_future(writer.finish(lambda r: r))
    await asyncio.get_running_loop().run_in_executor(None, store.entered.wait)
    called = asyncio.Event()
    asyncio.get_running_loop().call_soon(called.set)
    await called.wait()  # the loop runs on while the commit waits for the disk
    assert not finishing.done()
    store.gate.set()
    await finishing
    assert writer.unsaved == {}
    records, _ = reload(store)
    assert records[final.id].status is JobStatus.FINISHED


async def test_records_persisted_together_share_commits(store: GatedStore) -> None:
    writer = opened(store)
    store.gate.clear()  # the first commit waits until everything is queued
    loop = asyncio.get_running_loop()
    persisting = asyncio.ensure_future(writer.persist_all([record(n, JobStatus.STOPPED) for n in range(8)]))
    await loop.run_in_executor(None, store.entered.wait)
    store.gate.set()
    await persisting
    writer.close()
    assert sum(len(c) for c in store.commits) == 8 and len(store.commits) <= 2
    records, _ = reload(store)
    assert {r.status for r in records.values()} == {JobStatus.STOPPED} and len(records) == 8


async def test_entries_the_fast_json_parser_refuses_are_read_by_json(store: GatedStore) -> None:
    # json.dumps writes NaN and Infinity, and a lone surrogate for each undecodable argv byte: orjson refuses them
    odd = [
        dataclasses.replace(record(1, JobStatus.FINISHED), timeout_seconds=float("inf")),
        dataclasses.replace(record(2, JobStatus.FINISHED), command=(b"printf", b"\xff\xfe\x80")),
        dataclasses.replace(record(3, JobStatus.FINISHED), reason="caf\u00e9 \U0001f600"),
    ]
    writer = opened(store)
    for r in odd:
        await writer.save(r)
    writer.close()
    records, skipped = reload(store)
    assert skipped == [] and [records[r.id] for r in odd] == odd
    nan = store_json(dataclasses.replace(record(4, JobStatus.FINISHED), timeout_seconds=float("nan")))
    assert b"NaN" in journal_line(nan)
    last, _ = read_journal(journal_line(nan))
    entry = last[nan["id"]]
    assert entry is not None and entry["timeout_seconds"] != entry["timeout_seconds"]  # NaN


async def test_a_restart_that_keeps_the_journal_as_it_found_it_compacts_it_from_the_offsets_it_read(
    store: GatedStore,
) -> None:
    writer = opened(store)
    for n in range(6):
        await writer.save(record(n, JobStatus.FINISHED))
    writer.close()
    store.close()
    again = GatedStore(store.root)
    try:
        records, _ = again.load_all()
        writer = RecordWriter(again, again.remove)
        writer.open(records)  # one entry per job already: not written again, the offsets load_all read kept
        await writer.save(dataclasses.replace(record(2, JobStatus.FINISHED), reason="saved again"))
        writer.remove(record(4).id)
        await writer.settled()
        before = (again.root / JOURNAL).read_bytes().count(b"\n")
        size = again.compact(lambda: (), threading.Lock())
        assert size == (again.root / JOURNAL).stat().st_size and before == 8
        compacted = (again.root / JOURNAL).read_bytes()
        last, whole = read_journal(compacted)  # every line copied whole (record.json would hide a torn one)
        assert whole == len(compacted) and compacted.count(b"\n") == 5  # jobs 0, 1, 3, 5 and the new 2
        assert set(last) == {record(n).id for n in (0, 1, 2, 3, 5)}
        writer.close()
    finally:
        again.close()
    records_after, skipped = reload(again)
    assert skipped == [] and set(records_after) == {record(n).id for n in (0, 1, 2, 3, 5)}
    assert records_after[record(2).id].reason == "saved again"
    assert all(records_after[record(n).id] == record(n, JobStatus.FINISHED) for n in (0, 1, 3, 5))
