"""History: what 50,000 kept job records cost (restart, memory, lookups, the janitor, a List page).

A state dir with N ended jobs (records and small output logs, as a server leaves them) is made once per run; a
fresh interpreter then opens it as `jobsvc serve` would (JobManager.open + reconcile) and measures. Baselines in
the same run: reading the N record files and nothing else (the floor of a restart that reads every record), and
the RSS of an interpreter with the engine imported and no jobs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from bench.common import Options, Result

PROBE = r"""
import asyncio, json, os, sys, tempfile, time
from pathlib import Path
from jobsvc.manager import EngineConfig, JobManager

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6

async def main():
    state, work = Path(sys.argv[1]), Path(sys.argv[2])
    if sys.argv[3] == "bare":
        print(json.dumps({"rss_mb": rss_mb()}))
        return
    t = time.perf_counter()
    m = JobManager.open(EngineConfig(state_dir=state, work_root=work, keep_finished_per_user=None,
                                     keep_finished_seconds=None, max_total_output_bytes=None))
    await m.reconcile()
    restart = time.perf_counter() - t
    rss = rss_mb()
    ids = [r.id for r in m.list_page("CN=user1", limit=1000)[0]]
    t = time.perf_counter()
    for i in ids:
        m.get("CN=user1", i[:8])
    prefix_us = (time.perf_counter() - t) / len(ids) * 1e6
    t = time.perf_counter()
    m.collect_garbage()
    janitor_ms = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    page, _ = m.list_page("CN=user1", limit=500, newest_first=True)
    page_ms = (time.perf_counter() - t) * 1e3
    await m.shutdown(grace=0)
    print(json.dumps({"restart_s": restart, "rss_mb": rss, "prefix_us": prefix_us, "janitor_ms": janitor_ms,
                      "page_ms": page_ms, "jobs": len(m.list("CN=user1")) * 5}))

asyncio.run(main())
"""


def make_state(state: Path, n: int) -> None:
    from jobsvc.model import JobRecord
    from jobsvc.output import STDOUT, OutputLog
    from jobsvc.states import JobStatus
    from jobsvc.store import record_to_json

    (state / "jobs").mkdir(parents=True)
    (state / "format").write_text("1\n")
    t0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    for i in range(n):
        job_id = str(uuid.uuid4())
        d = state / "jobs" / job_id
        d.mkdir()
        log = OutputLog(d / "output", segment_size=65536)
        log.append(STDOUT, b"output of job %d\n" % i)
        log.close()
        started = t0 + dt.timedelta(seconds=i)
        record = JobRecord(
            id=job_id,
            owner=f"CN=user{i % 5}",
            command=(b"sh", b"-c", b"echo output of job %d" % i),
            status=JobStatus.FINISHED,
            started_at=started,
            ended_at=started + dt.timedelta(seconds=1),
            exit_code=0,
            pid=1000 + i,
            uid=61184 + i % 100,
            output_bytes=log.size,
            workdir=f"/var/tmp/jobsvc/{job_id}",
        )
        (d / "record.json").write_text(json.dumps(record_to_json(record)))


def read_floor(state: Path) -> float:
    """Seconds to open and read every record file, parsing nothing."""
    base = state / "jobs"
    t = time.perf_counter()
    for name in os.listdir(base):
        fd = os.open(f"{base}/{name}/record.json", os.O_RDONLY)
        os.read(fd, 1 << 20)
        os.close(fd)
    return time.perf_counter() - t


def probe(state: Path, work: Path, mode: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(state), str(work), mode], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run(opts: Options) -> Result:
    n = 5_000 if opts.quick else 50_000
    result = Result("history", params={"kept_records": n})
    t0 = time.monotonic()
    root = opts.scratch / "history"
    shutil.rmtree(root, ignore_errors=True)
    state, work = root / "state", root / "work"
    make_state(state, n)
    work.mkdir(parents=True)
    os.chmod(root, 0o711)
    floor = min(read_floor(state) for _ in range(3))
    bare = probe(state, work, "bare")["rss_mb"]
    got = min((probe(state, work, "full") for _ in range(2)), key=lambda r: r["restart_s"])
    result.data.update(got, read_floor_s=floor, bare_rss_mb=bare)
    label = f"{n:,} kept records"
    result.check(
        f"restart with {label}",
        round(got["restart_s"], 2),
        "s",
        target="< 3 s",
        ok=got["restart_s"] < 3,
        baseline=round(floor, 3),
        baseline_name="read every record file",
    )
    result.check(
        f"server RSS with {label}",
        round(got["rss_mb"], 1),
        "MB",
        target="< 150 MB",
        ok=got["rss_mb"] < 150,
        baseline=round(bare, 1),
        baseline_name="engine imported, no jobs",
    )
    result.check(f"Get by 8-character id prefix with {label}", round(got["prefix_us"], 1), "us")
    result.check(f"janitor round on the event loop with {label}", round(got["janitor_ms"], 2), "ms")
    result.check(f"List page of 500 (newest first) with {label}", round(got["page_ms"], 2), "ms")
    if not opts.keep:
        shutil.rmtree(root, ignore_errors=True)
    result.seconds = time.monotonic() - t0
    return result
