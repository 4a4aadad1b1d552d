"""Where jobs work: a fresh working directory per job, and the job's private /tmp and /var/tmp.

    <root>/                       0711: a job may enter its own directory by name, not list the others
      <job id>/                   the job's fresh working directory (HOME), owned by its uid while it runs
      .private/                   0700 root: reachable by a job only through its own namespace's /tmp, /var/tmp
        <job id>.tmp, .var-tmp    1777, bound over /tmp and /var/tmp in the job's mount namespace

A transient uid comes back to a later job, so nothing a job leaves may stay reachable by that uid: its private
dirs are removed when it ends, and its working directory is kept (for whoever administers the host) but given
to root, mode 0700 [systemd: DynamicUser= with PrivateTmp= and RemoveIPC=].

Every directory made here is an inode allocated, and later freed, per job. On ext4 without a journal (this
project's test hosts) each allocation walks past the inodes freed in the last minutes (ext4's recently_deleted()):
under churn that walk was a third of all CPU samples (perf), about 40% of the server's own CPU. So a job's private
dirs sit side by side under .private (two inodes, not three with a per-job parent); .private itself keeps them out
of every job's reach.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Protocol

PRIVATE = ".private"


class Workspace(Protocol):
    """The engine's view of where jobs work (WorkRoot; an in-memory fake in the unit tests)."""

    def make_workdir(self, job_id: str, uid: int, gid: int) -> Path: ...

    def make_private(self, job_id: str) -> tuple[str, str]: ...

    def retire(self, job_id: str) -> None: ...

    def clear_private(self, job_id: str) -> bool: ...

    def remove_private(self, job_id: str) -> None: ...

    def remove(self, job_id: str) -> None: ...


class WorkRoot:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._private = root / PRIVATE

    def prepare(self) -> None:
        """Create the root (and its private area) with their modes; idempotent."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        self._private.mkdir(exist_ok=True)
        os.chmod(self._private, 0o700)

    def make_workdir(self, job_id: str, uid: int, gid: int) -> Path:
        path = f"{self.root}/{job_id}"  # plain str paths on the Start path: pathlib's parsing showed in its profile
        os.mkdir(path, 0o700)
        os.chown(path, uid, gid)
        return Path(path)

    def _private_dirs(self, job_id: str) -> tuple[str, str]:
        base = f"{self._private}/{job_id}"
        return f"{base}.tmp", f"{base}.var-tmp"

    def make_private(self, job_id: str) -> tuple[str, str]:
        """The job's private /tmp and /var/tmp (sticky and world-writable inside, like the real ones)."""
        dirs = self._private_dirs(job_id)
        for d in dirs:
            os.mkdir(d, 0o700)
            os.chmod(d, 0o1777)
        return dirs

    def clear_private(self, job_id: str) -> bool:
        """Remove the job's private /tmp and /var/tmp if the job left them empty (most jobs: two rmdirs); False if
        anything is left, for remove_private(). Blocking: on a filesystem mounted with `discard` an rmdir waits
        for the discard of the directory's block."""
        try:
            for d in self._private_dirs(job_id):
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(d)
        except OSError:  # ENOTEMPTY mostly; whatever it is, the thorough way decides
            return False
        return True

    def retire(self, job_id: str) -> None:
        """The job has ended: its working directory becomes root's (its uid may run the next job)."""
        path = self.root / job_id
        try:
            os.chown(path, 0, 0, follow_symlinks=False)
            os.chmod(path, 0o700)  # root's own directory (its parent is root's too): not a job's symlink
        except FileNotFoundError:
            pass

    def remove_private(self, job_id: str) -> None:
        """Delete the job's private /tmp and /var/tmp (blocking: can be many files; call it off the loop); also
        <job id>/{tmp,var-tmp}, where a jobsvc before this one put them."""
        for d in (*self._private_dirs(job_id), f"{self._private}/{job_id}"):
            if os.path.islink(d):  # never followed: the entry itself goes
                with contextlib.suppress(OSError):
                    os.unlink(d)
            else:
                shutil.rmtree(d, ignore_errors=True)

    def remove(self, job_id: str) -> None:
        """Delete everything of the job (retention, or a Start that failed); blocking."""
        shutil.rmtree(self.root / job_id, ignore_errors=True)
        self.remove_private(job_id)
