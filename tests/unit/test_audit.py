"""The audit log keeps room for its lines ahead of them, refuses new calls before it runs out, and never drops a
line without saying so."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from jobsvc.server import audit
from jobsvc.server.audit import AuditLog


def test_room_is_reserved_past_the_end_without_growing_the_file(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    log.write('{"method":"Get"}')
    st = os.stat(tmp_path / "audit.log")
    assert st.st_size < 200 and st.st_blocks * 512 >= audit.RESERVE  # allocated, but the file is one line long
    assert log.accepting
    log.close()


def test_when_the_reserve_cannot_grow_new_calls_are_refused_before_it_runs_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(audit, "RESERVE", 8 << 10)
    monkeypatch.setattr(audit, "RENEW_BELOW", 4 << 10)
    monkeypatch.setattr(audit, "MARGIN", 2 << 10)
    log = AuditLog(tmp_path / "audit.log")

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit, "reserve", full)
    written = 0
    while log.accepting:
        log.write('{"method":"Get","pad":"' + "x" * 100 + '"}')
        written += 1
        assert written < 1000
    lines = (tmp_path / "audit.log").read_text().splitlines()
    assert len(lines) == written  # every call that ran has its line
    assert "cannot reserve room" in caplog.text
    # a line that cannot be written at all is said in the server log, not lost without a word
    real_write = os.write
    monkeypatch.setattr(
        "jobsvc.server.audit.os.write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )
    with caplog.at_level(logging.ERROR, "jobsvc.audit"):
        log.write('{"method":"Stop","job_id":"abc"}')
    assert "audit line NOT written" in caplog.text and '"job_id":"abc"' in caplog.text
    monkeypatch.setattr("jobsvc.server.audit.os.write", real_write)
    log.close()
