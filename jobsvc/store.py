"""Job records on disk, one JSON file per job, written atomically (temp file, fsync, rename)."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from jobsvc import codec
from jobsvc.lock import DirLock, LockHeldError
from jobsvc.model import JobRecord

FORMAT_VERSION = 1


class StateDirError(RuntimeError):
    """The state dir cannot be used (unreadable, or written by a newer jobsvc); nothing in it was changed."""


def _atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


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


class JobStore:
    """The state dir: <dir>/lock, <dir>/instance, <dir>/jobs/<id>/{record.json, output/}.

    One store owns a state dir at a time: the lock is taken before anything in it is read, and held until close().
    """

    def __init__(self, state_dir: Path, durable: bool = True) -> None:
        self.root = state_dir
        self.durable = durable
        self.jobs_dir = state_dir / "jobs"
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
                if int(text) > FORMAT_VERSION:
                    raise StateDirError(
                        f"state dir {state_dir} was written by a newer jobsvc (format {text}; this one reads "
                        f"{FORMAT_VERSION}); refusing to touch it"
                    )
            else:
                _atomic_write(version_file, f"{FORMAT_VERSION}\n".encode(), self.durable)
        except OSError as e:
            raise StateDirError(f"state dir {state_dir}: {e.strerror}") from None

    def close(self) -> None:
        """Give up the state dir (another server may take it)."""
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

    def output_dir(self, job_id: str) -> Path:
        return Path(f"{self.jobs_dir}/{job_id}/output")  # one parse: a restart makes one per kept job

    def save(self, record: JobRecord) -> None:
        d = self.job_dir(record.id)
        d.mkdir(exist_ok=True, mode=0o700)
        _atomic_write(d / "record.json", json.dumps(record_to_json(record)).encode(), self.durable)

    def load(self, job_id: str) -> JobRecord:
        return self._load_from(str(self.job_dir(job_id) / "record.json"))

    def load_all(self) -> tuple[list[JobRecord], list[tuple[str, str]]]:
        """Every readable record, and (job dir, why) for each one skipped. Nothing is deleted.

        Plain os calls on str paths: at 50,000 records pathlib's objects were most of a restart.
        """
        records, skipped = [], []
        base = str(self.jobs_dir)
        with os.scandir(base) as entries:
            names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        for name, is_dir in sorted(names):
            if not is_dir:
                skipped.append((name, "not a job directory"))
                continue
            try:
                record = self._load_from(f"{base}/{name}/record.json")
                if record.id != name:
                    raise ValueError(f"record names job {record.id!r}")
                records.append(record)
            except FileNotFoundError:
                skipped.append((name, "no record.json (a start that was never acknowledged)"))
            except (OSError, ValueError, KeyError, TypeError) as e:
                skipped.append((name, f"unreadable record: {type(e).__name__}: {e}"))
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
