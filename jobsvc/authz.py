"""Who may act on which job. Pure: identities are certificate Subjects (RFC 4514 strings)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Authz:
    """Owners act on their own jobs; operators named with `jobsvc serve --admin SUBJECT` act on every job."""

    admins: frozenset[str] = field(default_factory=frozenset)

    def is_admin(self, identity: str) -> bool:
        return identity in self.admins
