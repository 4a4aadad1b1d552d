"""The Unix users jobs run as: a transient uid per job from a reserved range, or one named user by opt-in."""

from __future__ import annotations

import pwd
from dataclasses import dataclass

from jobsvc.errors import InvalidArgumentError, ResourceExhaustedError

# systemd's DynamicUser= range: nothing else on a host should own these ids
DYNAMIC_RANGE = (61184, 65519)


@dataclass(frozen=True)
class JobUser:
    uid: int
    gid: int


def named_user(name: str) -> JobUser:
    """A fixed account for every job (`--job-user`), e.g. root on a trusted single-user host."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise InvalidArgumentError(f"job user {name!r} does not exist") from None
    return JobUser(entry.pw_uid, entry.pw_gid)


class UidPool:
    """Hands out uids no live job holds, so one job cannot signal, ptrace or read /proc of another.

    A cursor walks the range, so a uid freed now is the last to come back (files a job left in a world-writable
    place are not handed to the next job at once). Ids that /etc/passwd already uses are skipped.
    """

    def __init__(self, first: int = DYNAMIC_RANGE[0], last: int = DYNAMIC_RANGE[1]) -> None:
        if not 0 < first <= last:
            raise ValueError(f"bad uid range {first}-{last}")
        self._first, self._last = first, last
        self._next = first
        self._in_use: set[int] = set()
        self._reserved = {e.pw_uid for e in pwd.getpwall() if first <= e.pw_uid <= last}

    def acquire(self) -> JobUser:
        size = self._last - self._first + 1
        for i in range(size):
            uid = self._first + (self._next - self._first + i) % size
            if uid not in self._in_use and uid not in self._reserved:
                self._in_use.add(uid)
                self._next = uid + 1 if uid < self._last else self._first
                return JobUser(uid, uid)
        raise ResourceExhaustedError(f"all {size} job uids ({self._first}-{self._last}) are in use")

    def release(self, user: JobUser) -> None:
        self._in_use.discard(user.uid)

    @property
    def in_use(self) -> int:
        return len(self._in_use)
