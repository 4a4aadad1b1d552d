"""Job.restore sets every slot itself (a restart restores 50,000 jobs): it must leave what __init__ would have.

The reference is the way restore was written before: __init__ with the record's values, then the record's fields
copied over, its exit info and its lost output taken. A slot __init__ gains and restore does not set fails here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest

from jobsvc import job as job_module
from jobsvc.cgroups.base import ENDED
from jobsvc.job import Job
from jobsvc.model import ExitInfo, JobRecord, Limits, Usage
from jobsvc.output import OutputLog
from jobsvc.states import JobStatus

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def a_record(**changes: object) -> JobRecord:
    record = JobRecord(
        id="0f1e2d3c-0000-4000-8000-000000000001",
        owner="CN=alice",
        command=(b"sh", b"-c", b"echo \xff"),
        status=JobStatus.STOPPED,
        reason="stopped by owner",
        exit_code=None,
        signal=15,
        oom_killed=True,
        pids_limit_hit=True,
        pid=4242,
        started_at=T0,
        ended_at=T0 + dt.timedelta(seconds=3),
        limits=Limits(cpu=0.5, memory_bytes=1 << 20, pids=10),
        usage=Usage(cpu_seconds=1.5, memory_peak_bytes=4096),
        output_bytes=100,
        uid=61234,
        output_dropped_bytes=10,
        output_lost_bytes=5,
        timeout_seconds=30.0,
        workdir="/var/tmp/jobsvc/x",
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def the_old_way(record: JobRecord, output: OutputLog) -> Job:
    job = Job(
        record.id,
        record.owner,
        record.command,
        record.limits,
        ENDED,
        output,
        uid=record.uid,
        workdir=record.workdir,
        timeout=record.timeout_seconds,
        ended=True,
    )
    job_module._restore_fields(job, record)
    job.exit = ExitInfo(record.exit_code, record.signal)
    output.lost_bytes = max(output.lost_bytes, record.output_lost_bytes)
    return job


def slots_of(job: Job) -> dict[str, object]:
    return {name: getattr(job, name) for name in Job.__slots__}


@pytest.mark.parametrize(
    "record",
    [
        a_record(),
        a_record(status=JobStatus.FINISHED, reason=None, exit_code=0, signal=None, limits=Limits(), usage=Usage()),
        a_record(
            status=JobStatus.FINISHED,
            reason="oom",
            exit_code=3,
            signal=None,
            uid=None,
            workdir=None,
            timeout_seconds=None,
        ),
    ],
)
def test_a_restored_job_holds_what_init_and_the_record_would_have_given_it(tmp_path: Path, record: JobRecord) -> None:
    restored = Job.restore(record, ENDED, OutputLog.ended(tmp_path / "a", 100, 10, 0))
    reference = the_old_way(record, OutputLog.ended(tmp_path / "b", 100, 10, 0))
    got, want = slots_of(restored), slots_of(reference)
    assert got.pop("output").lost_bytes == want.pop("output").lost_bytes == record.output_lost_bytes  # type: ignore[attr-defined]
    assert got.pop("_ended").is_set() and want.pop("_ended").is_set()  # type: ignore[attr-defined]
    assert got == want
    assert restored.record() == reference.record() == dataclasses.replace(record, output_lost_bytes=5)


def test_restore_refuses_a_job_that_has_not_ended(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only ended jobs"):
        Job.restore(a_record(status=JobStatus.RUNNING), ENDED, OutputLog.ended(tmp_path, 0, 0, 0))


def test_restored_jobs_share_their_exit_info_and_live_usage_but_keep_their_own_values(tmp_path: Path) -> None:
    a = Job.restore(a_record(exit_code=0, signal=None), ENDED, OutputLog.ended(tmp_path / "a", 0, 0, 0))
    b = Job.restore(a_record(exit_code=0, signal=None), ENDED, OutputLog.ended(tmp_path / "b", 0, 0, 0))
    c = Job.restore(a_record(exit_code=1, signal=None), ENDED, OutputLog.ended(tmp_path / "c", 0, 0, 0))
    odd = Job.restore(a_record(exit_code=10**6, signal=None), ENDED, OutputLog.ended(tmp_path / "d", 0, 0, 0))
    assert a.exit is b.exit and a._live is b._live
    assert c.exit == ExitInfo(1, None) and c.exit is not a.exit
    assert odd.exit == ExitInfo(10**6, None) and (10**6, None) not in job_module._EXITS  # not kept for ever
    assert a.record().exit_code == 0 and c.record().exit_code == 1 and odd.record().exit_code == 10**6
