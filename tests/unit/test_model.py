from __future__ import annotations

import datetime as dt
import json
import os
import signal

from jobsvc.model import ExitInfo, IoLimit, JobRecord, Limits, Usage
from jobsvc.states import JobStatus
from jobsvc.store import record_from_json, record_to_json

T0 = dt.datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=dt.UTC)


def make_record(**kw: object) -> JobRecord:
    base: dict[str, object] = {
        "id": "0b7d1b1e-5f0e-4b8e-9a59-6f2f3c1d2e4f",
        "owner": "CN=alice,O=Example",
        "command": (b"sh", b"-c", b"echo \xff"),
        "status": JobStatus.FINISHED,
        "started_at": T0,
        "ended_at": T0 + dt.timedelta(seconds=2),
        "exit_code": 3,
        "pid": 42,
        "limits": Limits(cpu=0.5, memory_bytes=64 << 20, pids=20, io=(IoLimit("254:0", write_bps=1 << 20),)),
        "usage": Usage(cpu_seconds=1.5, cpu_throttled_periods=4, memory_peak_bytes=1000),
        "output_bytes": 12,
        "uid": 61184,
    }
    base.update(kw)
    return JobRecord(**base)  # type: ignore[arg-type]


def test_json_form_has_every_field_with_rfc3339_times() -> None:
    d = json.loads(make_record().to_json())
    assert d == {
        "id": "0b7d1b1e-5f0e-4b8e-9a59-6f2f3c1d2e4f",
        "owner": "CN=alice,O=Example",
        "command": ["sh", "-c", "echo \\xff"],
        "status": "finished",
        "reason": None,
        "exit_code": 3,
        "signal": None,
        "oom_killed": False,
        "pids_limit_hit": False,
        "pid": 42,
        "started_at": "2026-11-28T12:00:00.123456Z",
        "ended_at": "2026-11-28T12:00:02.123456Z",
        "limits": {
            "cpu": 0.5,
            "memory_bytes": 64 << 20,
            "pids": 20,
            "io": [
                {
                    "device": "254:0",
                    "read_bps": None,
                    "write_bps": 1 << 20,
                    "read_iops": None,
                    "write_iops": None,
                }
            ],
        },
        "usage": {
            "cpu_seconds": 1.5,
            "cpu_throttled_periods": 4,
            "memory_peak_bytes": 1000,
            "io_read_bytes": None,
            "io_write_bytes": None,
        },
        "output_bytes": 12,
        "uid": 61184,
        "output_dropped_bytes": 0,
        "output_lost_bytes": 0,
        "timeout_seconds": None,
        "workdir": None,
    }


def test_running_record_has_null_end() -> None:
    d = make_record(status=JobStatus.RUNNING, ended_at=None, exit_code=None).to_dict()
    assert d["status"] == "running" and d["ended_at"] is None and d["exit_code"] is None


def test_store_round_trip_keeps_non_utf8_argv() -> None:
    rec = make_record(signal=9, exit_code=None, oom_killed=True, pids_limit_hit=True, reason="oom")
    again = record_from_json(json.loads(json.dumps(record_to_json(rec))))
    assert again == rec
    assert again.command[2] == b"echo \xff"


def test_exit_info_from_wait_status() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    _, status = os.waitpid(pid, 0)
    assert ExitInfo.from_wait_status(status) == ExitInfo(exit_code=7, signal=None)
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert ExitInfo.from_wait_status(status) == ExitInfo(exit_code=None, signal=9)


def test_wait_code() -> None:
    assert make_record(exit_code=3).wait_code == 3
    assert make_record(exit_code=None, signal=15).wait_code == 143
