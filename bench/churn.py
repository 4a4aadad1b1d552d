"""Churn: 10,000 jobs of /bin/true started and reaped (32 clients in flight, each Start then Wait), throughput in
jobs/s, then checks that no groups (under the server's <own>/jobsvc/<instance>/ in every hierarchy), descriptors
(/proc/<server>/fd) or zombies (children of the server or its spawn helper) are left. Baseline: the same number of
/bin/true spawned and reaped directly (posix_spawn + waitpid, one thread per core) in the same run; and the design's
kernel floor: bench/design_floor.c does each job's kernel work (6 groups made, joined and removed, the working and
private dirs, the namespaces and mounts, the uid switch, exec and reap of /bin/true) with nothing else, one process
per core, so the churn row also reads as a share of what any implementation of this design could reach here."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import (
    Options,
    Result,
    Server,
    fd_targets,
    processes_with_parent,
    run_server_bench,
    start_job,
    stub,
    timed_threads,
    wait_job,
)

CONCURRENCY = 32


def spawn_rate(n: int, threads: int | None = None) -> tuple[float, int]:
    """(seconds, jobs) to posix_spawn and reap n /bin/true, one thread per core."""
    threads = threads or (os.cpu_count() or 1)
    shares = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]

    def work(k: int) -> None:
        for _ in range(k):
            pid = os.posix_spawn("/bin/true", ["true"], {})
            os.waitpid(pid, 0)

    return timed_threads(work, shares), n


FLOOR_SOURCE = Path(__file__).with_name("design_floor.c")
FLOOR_UID = 65534  # nobody: outside jobsvc's pool of transient uids


def design_floor_rate(n: int, scratch: Path) -> tuple[float, int] | str:
    """(seconds, jobs) for bench/design_floor.c to do n jobs' kernel work, one process per core, in groups beneath
    this process's own (cgroup v1); else why it was not measured."""
    from jobsvc.cgroups.v1 import REQUIRED, find_hierarchies

    own = find_hierarchies()
    if any(c not in own for c in REQUIRED):
        return "needs the cgroup v1 hierarchies (this host has not got them all)"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "no C compiler (cc) to build bench/design_floor.c"
    scratch.mkdir(parents=True, exist_ok=True)
    binary = scratch / "design-floor"
    built = subprocess.run([cc, "-O2", "-o", str(binary), str(FLOOR_SOURCE)], capture_output=True, text=True)
    if built.returncode != 0:
        return f"bench/design_floor.c did not build: {built.stderr.strip()[-300:]}"
    dirs = scratch / "floor-dirs"
    shutil.rmtree(dirs, ignore_errors=True)
    dirs.mkdir()
    os.chmod(dirs, 0o711)
    parents = list(dict.fromkeys(own[c] / f"jobsvc-bench-design-floor-{os.getpid()}" for c in REQUIRED))
    procs = os.cpu_count() or 1
    shares = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    try:
        for p in parents:
            p.mkdir()
        t0 = time.perf_counter()
        runs = [
            subprocess.Popen(
                [str(binary), str(k), str(FLOOR_UID), str(FLOOR_UID), str(dirs), *map(str, parents)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for k in shares
        ]
        outs = [r.communicate()[0] for r in runs]
        seconds = time.perf_counter() - t0
        if any(r.returncode != 0 for r in runs):
            return f"bench/design_floor.c failed: exit {[r.returncode for r in runs]} (its stderr says why)"
        return seconds, sum(int(o.split()[1]) for o in outs)
    finally:
        for p in parents:  # a run that failed left its last job's groups (empty: the job was reaped)
            for group in [*(p.iterdir() if p.is_dir() else ()), p]:
                with contextlib.suppress(OSError):
                    if group.is_dir():
                        group.rmdir()
        shutil.rmtree(dirs, ignore_errors=True)


def leak_report(server: Server, fds_before: dict[str, str]) -> dict[str, Any]:
    groups = {str(d): sorted(p.name for p in d.iterdir() if p.is_dir()) for d in server.instance_dirs()}
    fds_now = fd_targets(server.pid)
    new_fds = {fd: target for fd, target in fds_now.items() if fds_before.get(fd) != target}
    helper = server.helper_pid
    parents = [server.pid] + ([helper] if helper else [])
    kids = [p for p in processes_with_parent(parents) if p[0] != helper]
    zombies = [p for p in kids if p[2] == "Z"]
    return {
        "groups_left": sum(len(v) for v in groups.values()),
        "groups_left_sample": {k: v[:5] for k, v in groups.items() if v},
        "fds_before": len(fds_before),
        "fds_after": len(fds_now),
        "new_fds_sample": dict(list(new_fds.items())[:10]),
        "zombies": len(zombies),
        "job_processes_left": len(kids),
        "helper_alive": helper is not None,
    }


def run(opts: Options) -> Result:
    n = 1000 if opts.quick else 10_000

    async def body(server: Server, result: Result) -> None:
        result.params = {
            "jobs": n,
            "command": "/bin/true",
            "clients_in_flight": CONCURRENCY,
            "each_client": "Start, then Wait until the job is reaped; one shared mTLS channel",
            "baseline": "posix_spawn + waitpid of /bin/true, one thread per core",
        }
        channel = server.aio_channel()
        s = stub(channel)
        failures: list[str] = []
        try:
            for _ in range(20):  # warm-up: lazily opened descriptors, the helper, the channel
                job = await start_job(s, "/bin/true")
                await wait_job(s, job.id)
            await asyncio.sleep(0.2)
            fds_before = fd_targets(server.pid)
            rss_before = server.rss_mb()
            cpu0, helper0 = server.cpu_seconds(), server.helper_cpu_seconds()
            remaining = n
            done = 0

            async def worker() -> None:
                nonlocal remaining, done
                while remaining > 0:
                    remaining -= 1
                    try:
                        job = await start_job(s, "/bin/true")
                        final = await wait_job(s, job.id)
                        if final.exit_code != 0:
                            failures.append(f"{job.id}: exit {final.exit_code}")
                    except Exception as e:  # count failures, keep churning
                        failures.append(f"{type(e).__name__}: {e}")
                    done += 1
                    if done % 1000 == 0:
                        print(f"  {done}/{n} jobs, {done / (time.perf_counter() - t0):.0f} jobs/s", flush=True)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            elapsed = time.perf_counter() - t0
            cpu, helper = server.cpu_seconds() - cpu0, server.helper_cpu_seconds() - helper0
            leaks_now = leak_report(server, fds_before)
            await asyncio.sleep(1.0)
            leaks = leak_report(server, fds_before)
            rss_after = server.rss_mb()
        finally:
            await channel.close()
        b_seconds, b_n = spawn_rate(n)
        rate, b_rate = round(n / elapsed, 1), round(b_n / b_seconds, 1)
        floor = design_floor_rate(n, server.workdir / "design-floor")
        floor_rate = round(floor[1] / floor[0], 1) if isinstance(floor, tuple) else None
        result.data = {
            "seconds": round(elapsed, 2),
            "jobs_per_s": rate,
            "baseline_jobs_per_s": b_rate,
            "design_floor_jobs_per_s": floor_rate,
            "failures": len(failures),
            "failure_sample": failures[:5],
            "server_cpu_ms_per_job": round(1000 * cpu / n, 3),
            "helper_cpu_ms_per_job": round(1000 * helper / n, 3),
            "server_rss_mb_before": rss_before,
            "server_rss_mb_after": rss_after,
            "leaks_immediately": leaks_now,
            "leaks_after_1s": leaks,
        }
        print(
            f"  {rate} jobs/s (baseline {b_rate} jobs/s, design floor {floor_rate} jobs/s); server CPU"
            f" {1000 * cpu / n:.2f} ms/job, helper "
            f"{1000 * helper / n:.2f} ms/job; RSS {rss_before} -> {rss_after} MB; leaks {leaks}",
            flush=True,
        )
        result.check(
            f"{n:,} x /bin/true started and reaped", rate, "jobs/s", baseline=b_rate, baseline_name="posix_spawn+wait"
        )
        if isinstance(floor, str):
            result.note(f"design floor not measured: {floor}")
        else:
            result.check(
                "design floor: each job's kernel work alone (C)",
                floor_rate,
                "jobs/s",
                baseline=b_rate,
                baseline_name="posix_spawn+wait",
            )
            result.check(
                f"{n:,} x /bin/true, against the design floor",
                rate,
                "jobs/s",
                baseline=floor_rate,
                baseline_name="design floor",
            )
        result.check("failed jobs", len(failures), "", target="0", ok=not failures)
        result.check(
            "groups left under the instance", leaks["groups_left"], "", target="0", ok=leaks["groups_left"] == 0
        )
        fd_growth = leaks["fds_after"] - leaks["fds_before"]
        result.check(
            "server fds: after - before", fd_growth, f"(of {leaks['fds_before']})", target="<= 0", ok=fd_growth <= 0
        )
        result.check(
            "zombies (children of server or helper)", leaks["zombies"], "", target="0", ok=leaks["zombies"] == 0
        )
        result.check(
            "job processes left", leaks["job_processes_left"], "", target="0", ok=leaks["job_processes_left"] == 0
        )
        result.check("server RSS after the churn", rss_after, "MB", baseline=rss_before, baseline_name="before")

    return run_server_bench("churn", opts, body)
