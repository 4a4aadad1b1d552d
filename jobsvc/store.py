"""Job records on disk: an append-only journal (the durable truth) and one JSON file per ended job (its mirror).

A batch of records is made durable by one append to <state dir>/journal and one fdatasync (group commit: see
jobsvc/records.py). An ended job's <id>/record.json is then renamed into place, unsynced: it is what a restart reads
for a job the journal does not name (a state dir of format 1, or a record written by hand), and what a person reads.
A running job has no mirror: the journal alone holds its record (a restart reads the journal first), so a job
costs one record.json (one inode) in all, not one per record it has had; see jobsvc/workroot.py for why inodes count.
The journal is rewritten (compacted) to one line per kept job, so it stays the size of what is kept: the store
knows where each job's last entry is, so compaction copies those lines as they are (nothing parsed), while commits
go on; only what they appended meanwhile is copied under the commit lock, before the rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
import zlib
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import orjson

from jobsvc import codec
from jobsvc.lock import DirLock, LockHeldError
from jobsvc.model import JobRecord

FORMAT_VERSION = 1  # of a record
# of the state dir: 2 added the journal, which a jobsvc that reads 1 would not know to replay
DIR_FORMAT = 2
JOURNAL = "journal"


class StateDirError(RuntimeError):
    """The state dir cannot be used (unreadable, or written by a newer jobsvc); nothing in it was changed."""


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    """n bytes at offset (one pread returns at most about 2 GiB); fewer only if the file is shorter, which the
    callers' sizes rule out, so that is an error rather than a journal silently cut short."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        part = os.pread(fd, n - got, offset + got)
        if not part:
            raise OSError(f"journal shorter than expected: {got} of {n} bytes at {offset}")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_new(path: Path, data: bytes, durable: bool) -> int:
    """A new file at path holding data (on disk when durable); its descriptor, for writing more."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
        if durable:
            os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """path holds data, or what it held before (a crash never leaves a torn file); durable: the rename too."""
    tmp = path.with_name(f".{path.name}.tmp")
    os.close(_write_new(tmp, data, durable))
    os.rename(tmp, path)
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(path: str | Path) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def journal_line(entry: dict[str, Any]) -> bytes:
    """One journal entry: its CRC-32 in hex, a space, its JSON (which has no raw newline), a newline."""
    return _line_of(json.dumps(entry).encode())


def _line_of(payload: bytes) -> bytes:
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def record_json(record: JobRecord) -> bytes:
    """The record as JSON: what its journal line and its record.json both hold (encoded once for both)."""
    return json.dumps(record_to_json(record)).encode()


class Entry(NamedTuple):
    """One journal line and the job it names (removed: a tombstone)."""

    job_id: str
    line: bytes
    removed: bool = False


def record_entry(record: JobRecord, payload: bytes | None = None) -> Entry:
    """The record's journal entry; payload, if given, is its record_json()."""
    return Entry(record.id, _line_of(record_json(record) if payload is None else payload))


def removal_entry(job_id: str) -> Entry:
    return Entry(job_id, journal_line({"removed": job_id}), True)


def read_journal(data: bytes) -> tuple[dict[str, dict[str, Any] | None], int]:
    """The last entry of each job id (None: removed), and how many bytes of data are whole entries.

    Appends are in order and a batch is acknowledged only after its fdatasync, so only the tail can be torn (a
    crash mid-append): reading stops at the first line whose CRC does not match, and nothing after it was
    acknowledged."""
    last, good, _ = scan_journal(data, lambda entry: entry)
    return last, good


def scan_journal(
    data: bytes, decode: Callable[[dict[str, Any]], T], where: dict[str, int] | None = None
) -> tuple[dict[str, T | None], int, int]:
    """read_journal, each record entry given to decode as it is read (its result kept, or the exception it
    raised); also how many entries there were (superseded ones included). where, if given, gets the offset of
    each job's last entry that is a record, for a job whose last entry is one (the entry ends at the next newline).

    A restart decodes entry by entry: 50,000 entries parsed first and decoded after left a heap of freed dicts
    between the records (+100 MB of RSS that stayed)."""
    last: dict[str, T | None] = {}
    good = entries = 0
    view = memoryview(data)  # the payloads are parsed where they are, not copied out line by line
    find = data.find
    while good < len(data):
        end = find(b"\n", good)
        if end < 0:
            break
        space = find(b" ", good, end)
        if space < 0:
            space = end
        payload = view[space + 1 : end]
        try:
            if int(data[good:space], 16) != zlib.crc32(payload):
                break
            entry = _parse(payload)
        except ValueError:
            break
        entries += 1
        if "removed" in entry:
            last[entry["removed"]] = None
            if where is not None:
                where.pop(entry["removed"], None)
        else:
            job_id = entry.get("id")
            if not isinstance(job_id, str):
                break  # not an entry this jobsvc wrote: nothing after it is trusted either
            try:
                last[job_id] = decode(entry)
            except (ValueError, KeyError, TypeError) as e:
                last[job_id] = e  # type: ignore[assignment]  # load_all reports it as unreadable
            if where is not None:
                where[job_id] = good
        good = end + 1
    return last, good, entries


def _parse(payload: memoryview) -> Any:
    """A journal entry's JSON: orjson (a quarter of json's time at a restart); json where orjson refuses what
    json.dumps writes (NaN and Infinity, the lone surrogates of undecodable argv). orjson reads an integer beyond
    64 bits as a float: a record holds none (every integer field fits its proto's 64-bit one)."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return json.loads(bytes(payload))


T = TypeVar("T")

_ARGV_KEYS = tuple(codec.store_extras(JobRecord))  # the bytes fields, kept losslessly beside their text
_to_json = codec.json_encoder(JobRecord)
_from_json = codec.store_decoder(JobRecord)  # made once: a restart decodes every kept record


def record_to_json(record: JobRecord) -> dict[str, Any]:
    """The record's JSON form, its format number and its argv as they were (os.fsdecode, not display text)."""
    d = _to_json(record)
    d["format"] = FORMAT_VERSION
    for name, key in _ARGV_KEYS:
        d[key] = [os.fsdecode(a) for a in getattr(record, name)]
    return d


def record_from_json(d: dict[str, Any]) -> JobRecord:
    return _from_json(d)


REMOVED = "removed (its files were being deleted)"
NEVER_ACKNOWLEDGED = "no record.json (a start that was never acknowledged)"


class JobStore:
    """The state dir: <dir>/lock, <dir>/instance, <dir>/journal, <dir>/jobs/<id>/{record.json, output/} (each made
    when first needed: an ended job's record.json, the output/ of a job that wrote something).

    One store owns a state dir at a time: the lock is taken before anything in it is read, and held until close().
    """

    def __init__(self, state_dir: Path, durable: bool = True) -> None:
        self.root = state_dir
        self.durable = durable
        self.jobs_dir = state_dir / "jobs"
        self._journal = -1
        self._compact_as_loaded = False  # load_all() read a journal that rewrite() would write the same
        # Where each job's last entry is in the journal, for compaction (the commit lock's, see compact()): known
        # once rewrite() has written the journal (or found it as it would write it), kept up by commit().
        self._indexed = False
        # job id -> offset of its last entry, a record (it ends at the next newline): offsets alone, as a
        # restart keeps one per job (a tuple and a length each were 4 MB at 50,000)
        self._where: dict[str, int] = {}
        self._tombstones: set[str] = set()  # jobs whose last entry is a removal
        self._loaded: tuple[dict[str, int], set[str]] = ({}, set())  # load_all's, for rewrite()
        self._appended: list[str] | None = None  # jobs named by commits while a compaction copies
        self._rename_unsynced = False  # a compaction renamed the journal and its directory fsync failed
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock = DirLock.acquire(state_dir / "lock")
        except LockHeldError as e:
            holder = f"jobsvc pid {e.pid}" if e.pid is not None else "another jobsvc (pid unknown)"
            raise StateDirError(f"state dir {state_dir} is in use by {holder}") from None
        except OSError as e:
            raise StateDirError(f"state dir {state_dir}: {e.strerror}") from None
        try:
            self._open()
        except BaseException:
            self._lock.release()
            raise

    def _open(self) -> None:
        state_dir = self.root
        try:
            self.jobs_dir.mkdir(exist_ok=True, mode=0o700)
            version_file = state_dir / "format"
            if version_file.exists():
                text = version_file.read_text().strip()
                if not text.isdigit():
                    raise StateDirError(f"state dir {state_dir}: {version_file} is not a format number: {text[:40]!r}")
                if int(text) > DIR_FORMAT:
                    raise StateDirError(
                        f"state dir {state_dir} was written by a newer jobsvc (format {text}; this one reads "
                        f"{DIR_FORMAT}); refusing to touch it"
                    )
            if not version_file.exists() or int(text) < DIR_FORMAT:
                _atomic_write(version_file, f"{DIR_FORMAT}\n".encode(), self.durable)
            self._journal = os.open(self.root / JOURNAL, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StateDirError(f"state dir {state_dir}: {e.strerror}") from None

    def close(self) -> None:
        """Give up the state dir (another server may take it)."""
        if self._journal >= 0:
            os.close(self._journal)
            self._journal = -1
        self._lock.release()

    def instance_id(self) -> str:
        """This state dir's instance id (made once), naming its cgroup subtree."""
        path = self.root / "instance"
        try:
            ident = path.read_text().strip()
        except FileNotFoundError:
            ident = uuid.uuid4().hex[:12]
            _atomic_write(path, ident.encode() + b"\n", self.durable)
            return ident
        except (OSError, UnicodeDecodeError) as e:
            raise StateDirError(f"state dir {self.root}: cannot read {path}: {e}") from None
        if not (len(ident) == 12 and all(c in "0123456789abcdef" for c in ident)):
            raise StateDirError(
                f"state dir {self.root}: {path} holds no instance id ({ident[:40]!r}); refusing to guess"
            )
        return ident

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def output_path(self, job_id: str) -> str:
        """output_dir() as a str (no Path made: a restart asks once per kept job)."""
        return f"{self.jobs_dir}/{job_id}/output"

    def output_dir(self, job_id: str) -> Path:
        return Path(f"{self.jobs_dir}/{job_id}/output")  # one parse: a restart makes one per kept job

    def save(self, record: JobRecord) -> None:
        """Write one record durably (a batch of one; the engine batches them through records.RecordWriter)."""
        payload = record_json(record)
        tmp = self.stage(record, payload)
        try:
            self.commit([record_entry(record, payload)])
        except BaseException:
            if tmp is not None:
                self.unstage(tmp)
            raise
        if tmp is not None:
            self.publish(tmp)

    # -- the write path, in the order a batch takes it (records.RecordWriter, one thread) ---------------------------

    def stage(self, record: JobRecord, payload: bytes) -> str | None:
        """Write an ended job's mirror (payload: its record_json(), the bytes its journal line holds too) to a temp
        file beside record.json (unsynced); its path. None for a running job's record: it has no mirror.

        First, because it is where a full disk shows: a final record that does not fit is refused before the
        journal names it, so record.json and a restart both keep its last written state (a running job's record,
        with no mirror, is refused instead by the journal's append, with the rest of its batch)."""
        if record.ended_at is None:
            return None
        d = f"{self.jobs_dir}/{record.id}"
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)
        tmp = f"{d}/.record.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            if os.write(fd, payload) != len(payload):
                raise OSError(28, os.strerror(28), tmp)  # a short write: the disk is full
        except BaseException:
            os.close(fd)
            self.unstage(tmp)
            raise
        os.close(fd)
        return tmp

    @staticmethod
    def unstage(tmp: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(tmp)

    def commit(self, entries: Sequence[Entry]) -> None:
        """Append entries to the journal and make them durable (one fdatasync); on failure the journal is cut back
        to where it was, so that no later batch follows a torn entry."""
        data = b"".join(e.line for e in entries)
        end = os.lseek(self._journal, 0, os.SEEK_END)
        try:
            _write_all(self._journal, data)
            if self.durable:
                os.fdatasync(self._journal)
                if self._rename_unsynced:  # a compaction's rename is not durable yet: nor would this batch be
                    _fsync_dir(self.root)
                    self._rename_unsynced = False
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(self._journal, end)
            raise
        self._index(entries, end)
        if self._appended is not None:
            self._appended += [e.job_id for e in entries]

    def _index(self, entries: Iterable[Entry], at: int) -> None:
        where, tombstones = self._where, self._tombstones
        for e in entries:
            if e.removed:
                where.pop(e.job_id, None)
                tombstones.add(e.job_id)
            else:
                where[e.job_id] = at
                tombstones.discard(e.job_id)
            at += len(e.line)

    @staticmethod
    def publish(tmp: str) -> None:
        """Rename a staged mirror over record.json (its journal entry is durable: a torn mirror is never read)."""
        os.rename(tmp, tmp.replace("/.record.json.tmp", "/record.json"))

    def journal_size(self) -> int:
        return os.fstat(self._journal).st_size

    def compact(self, deleting: Callable[[], Collection[str]], lock: threading.Lock) -> int:
        """Rewrite the journal as the last entry of each job that has a record, and the tombstone of each removed
        job whose files are still being deleted (deleting(), asked after the journal's end is taken) or still
        there; returns the new size.

        lock is the one commit() is called under: it is held only to take the index, then to copy what commits
        appended meanwhile and put the new journal in place. The lines are copied as they are (a 4 MB journal
        parsed into dicts held the writer thread, and every Start waiting behind it, for a second)."""
        if not self._indexed:
            raise RuntimeError("compact() before rewrite(): where the entries are is not known")
        with lock:
            end = self.journal_size()
            where, tombstones = dict(self._where), set(self._tombstones)
            self._appended = []
        tmp = self.root / f".{JOURNAL}.tmp"
        fd = -1
        try:
            raw = _pread_all(self._journal, end, 0)
            data, find = memoryview(raw), raw.find
            parts: list[bytes | memoryview] = []
            index: dict[str, int] = {}
            at = 0
            for job_id, offset in sorted(where.items(), key=lambda item: item[1]):  # in journal order
                stop = find(b"\n", offset) + 1
                if stop <= offset:
                    raise RuntimeError(f"journal index: no entry ends after offset {offset}")
                parts.append(data[offset:stop])
                index[job_id] = at
                at += stop - offset
            still = deleting()
            kept = {j for j in tombstones if j in still or os.path.lexists(f"{self.jobs_dir}/{j}")}
            parts += [removal_entry(job_id).line for job_id in kept]
            fd = _write_new(tmp, b"".join(parts), self.durable)
            del data, raw, parts
            base = os.fstat(fd).st_size
            with lock:
                tail = _pread_all(self._journal, self.journal_size() - end, end)
                if tail:
                    _write_all(fd, tail)
                    if self.durable:
                        os.fdatasync(fd)
                os.close(fd)
                # the new journal's descriptor before the rename: once it is in place, no commit may go to the old
                fd = os.open(tmp, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
                os.rename(tmp, self.root / JOURNAL)
                old, self._journal, fd = self._journal, fd, -1
                for job_id in self._appended:  # what the commits since changed, at its new place
                    if job_id in self._where:
                        index[job_id] = self._where[job_id] - end + base
                        kept.discard(job_id)
                    else:
                        index.pop(job_id, None)
                        kept.add(job_id)
                self._where, self._tombstones, self._appended = index, kept, None
                with contextlib.suppress(OSError):  # the index is the new journal's already
                    os.close(old)
                if self.durable:  # before the next commit is acknowledged (else that commit does it first)
                    self._rename_unsynced = True
                    _fsync_dir(self.root)
                    self._rename_unsynced = False
                return base + len(tail)
        except BaseException:
            with lock:
                self._appended = None
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def rewrite(self, records: Iterable[JobRecord], removed: Iterable[str] = ()) -> int:
        """The journal as exactly these records and tombstones (a restart: what it loaded); returns the new size.

        Not written again when load_all() found it so already and nothing was appended since."""
        removed = list(removed)
        loaded, self._loaded = self._loaded, ({}, set())
        self._indexed = True
        if self._compact_as_loaded and not removed:
            self._compact_as_loaded = False
            self._where, self._tombstones = loaded
            return self.journal_size()
        entries = [record_entry(r) for r in records] + [removal_entry(job_id) for job_id in removed]
        data = b"".join(e.line for e in entries)
        _atomic_write(self.root / JOURNAL, data, self.durable)
        self._reopen_journal()
        self._where, self._tombstones = {}, set()
        self._index(entries, 0)
        return len(data)

    def _reopen_journal(self) -> None:
        fd = os.open(self.root / JOURNAL, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        os.close(self._journal)
        self._journal = fd

    def sync_jobs_dir(self) -> None:
        """Make removals of job directories durable (before the journal forgets their tombstones)."""
        if self.durable:
            _fsync_dir(self.jobs_dir)

    def load(self, job_id: str) -> JobRecord:
        """The job's last durable record as a restart reads it: its journal entry, else its record.json (reads the
        whole journal: for tests and tools, not a server's path). FileNotFoundError if it has none."""
        try:
            data = (self.root / JOURNAL).read_bytes()  # by name: the store may be closed
        except FileNotFoundError:
            data = b""
        journal, _, _ = scan_journal(data, record_from_json)
        if job_id not in journal:
            return self._load_from(str(self.job_dir(job_id) / "record.json"))
        entry = journal[job_id]
        if entry is None:
            raise FileNotFoundError(f"job {job_id} was removed")
        if isinstance(entry, Exception):
            raise entry
        return entry

    def load_all(self) -> tuple[list[JobRecord], list[tuple[str, str]]]:
        """Every readable record, and (job dir, why) for each one skipped. Nothing is deleted.

        Plain os calls on str paths: at 50,000 records pathlib's objects were most of a restart.
        """
        records, skipped = [], []
        base = str(self.jobs_dir)
        os.lseek(self._journal, 0, os.SEEK_SET)
        with os.fdopen(os.dup(self._journal), "rb") as f:
            data = f.read()
        where: dict[str, int] = {}
        journal, good, n_entries = scan_journal(data, record_from_json, where)
        del data
        from_files = 0
        with os.scandir(base) as entries:
            is_dir = {e.name: e.is_dir(follow_symlinks=False) for e in entries}
        # a job the journal names whose directory is gone (nothing of it but its record) is still a job
        for job_id, entry in journal.items():
            if entry is not None and job_id not in is_dir:
                is_dir[job_id] = True
        in_journal = journal.get
        for name in sorted(is_dir):
            if not is_dir[name]:
                skipped.append((name, "not a job directory"))
                continue
            entry = in_journal(name)
            if type(entry) is JobRecord and entry.id == name:  # the usual case, first
                records.append(entry)
                continue
            try:
                if name in journal:
                    if entry is None:
                        skipped.append((name, REMOVED))
                        continue
                    if isinstance(entry, Exception):
                        raise entry
                    record = entry
                else:
                    from_files += 1
                    record = self._load_from(f"{base}/{name}/record.json")
                if record.id != name:
                    raise ValueError(f"record names job {record.id!r}")
                records.append(record)
            except FileNotFoundError:
                skipped.append((name, NEVER_ACKNOWLEDGED))
            except (OSError, ValueError, KeyError, TypeError) as e:
                skipped.append((name, f"unreadable record: {type(e).__name__}: {e}"))
        # the journal already says exactly this (one entry per job, all of them read, nothing else): a restart
        # need not write it again
        self._compact_as_loaded = (
            good == self.journal_size() and n_entries == len(records) and not from_files and not skipped
        )
        if self._compact_as_loaded:
            self._loaded = (where, set())
        return records, skipped

    @staticmethod
    def _load_from(path: str) -> JobRecord:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            parts = []
            while chunk := os.read(fd, 1 << 20):
                parts.append(chunk)
        finally:
            os.close(fd)
        d = json.loads(b"".join(parts))
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        if int(d.get("format", 1)) > FORMAT_VERSION:
            raise ValueError(f"written by a newer jobsvc (format {d['format']})")
        return record_from_json(d)

    def remove(self, job_id: str) -> None:
        d = self.job_dir(job_id)
        for sub in sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(FileNotFoundError):
                sub.rmdir() if sub.is_dir() and not sub.is_symlink() else sub.unlink()
        with contextlib.suppress(FileNotFoundError):
            d.rmdir()
