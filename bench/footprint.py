"""Footprint: server RSS idle, with 1,000 finished jobs, with 100 running jobs, and over 10 GiB of output in total
(each GiB captured from a job and streamed once to a client). Target: RSS under 150 MB in every case, and no growth
with output. Baseline: the RSS of a bare interpreter that has imported what the server imports (grpc, cryptography),
measured in the same run: what any Python gRPC server costs before it holds a single job."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

from bench.common import (
    OUTPUT_QUOTAS,
    GiB,
    MiB,
    Options,
    Result,
    Server,
    pb,
    rss_mb,
    run_server_bench,
    start_job,
    stub,
    wait_job,
)

TARGET_MB = 150.0
GROWTH_LIMIT_MB = 5.0  # RSS after the last GiB minus after the first: "does not grow with output"


def bare_rss_mb() -> float:
    """RSS of `python -c 'import grpc, grpc.aio, cryptography.x509'` holding still."""
    code = (
        "import grpc, grpc.aio, cryptography.x509, sys\nsys.stdout.write('ok\\n'); sys.stdout.flush(); sys.stdin.read()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    proc.stdout.readline()
    rss = rss_mb(proc.pid)
    proc.stdin.close()
    proc.wait()
    return rss


async def _run_many(s: Any, argv: list[str], n: int, concurrency: int, wait: bool) -> list[str]:
    sem = asyncio.Semaphore(concurrency)
    ids: list[str] = []

    async def one() -> None:
        async with sem:
            job = await start_job(s, *argv)
            ids.append(job.id)
            if wait:
                await wait_job(s, job.id)

    await asyncio.gather(*(one() for _ in range(n)))
    return ids


async def _stream_all(s: Any, job_id: str) -> int:
    got = 0
    async for msg in s.Stream(pb().StreamRequest(id=job_id)):
        got += len(msg.data)
    return got


def run(opts: Options) -> Result:
    n_finished = 200 if opts.quick else 1000
    n_running = 100
    per_job = 256 * MiB if opts.quick else GiB
    n_output_jobs = 4 if opts.quick else 10

    async def body(server: Server, result: Result) -> None:
        result.params = {
            "finished_jobs": n_finished,
            "running_jobs": n_running,
            "output_jobs": n_output_jobs,
            "bytes_per_output_job": per_job,
            "output": "each job's output is captured, then streamed "
            "once to one asyncio client; its segment files are deleted after (disk, not server memory)",
        }
        phases: dict[str, dict[str, float]] = {}

        def sample(name: str) -> None:
            phases[name] = {
                "rss_mb": server.rss_mb(),
                "hwm_mb": server.hwm_mb(),
                "fds": len(os.listdir(f"/proc/{server.pid}/fd")),
            }
            helper = server.helper_pid
            if helper:
                phases[name]["helper_rss_mb"] = rss_mb(helper)
            print(f"  {name}: RSS {phases[name]['rss_mb']} MB (peak {phases[name]['hwm_mb']} MB)", flush=True)

        channel = server.aio_channel()
        s = stub(channel)
        try:
            await asyncio.sleep(1.0)
            sample("idle")
            await _run_many(s, ["true"], n_finished, 16, wait=True)
            await asyncio.sleep(0.5)
            sample(f"finished_{n_finished}")
            running = await _run_many(s, ["sleep", "3600"], n_running, 16, wait=False)
            await asyncio.sleep(0.5)
            sample("running_100")
            await asyncio.gather(*(s.Stop(pb().StopRequest(id=i, grace_seconds=0)) for i in running))
            sample("after_stopping_100")
            samples = [{"output_gib": 0.0, "rss_mb": server.rss_mb(), "hwm_mb": server.hwm_mb()}]
            total = 0
            t0 = time.monotonic()
            for _ in range(n_output_jobs):
                job = await start_job(s, "head", "-c", str(per_job), "/dev/zero")
                streamed = await _stream_all(s, job.id)  # follows it live, then to the end
                final = await wait_job(s, job.id)
                if streamed != per_job or final.output_bytes != per_job:
                    raise RuntimeError(f"job {job.id}: streamed {streamed}, captured {final.output_bytes}")
                server.drop_output(job.id)
                total += per_job
                samples.append(
                    {"output_gib": round(total / GiB, 2), "rss_mb": server.rss_mb(), "hwm_mb": server.hwm_mb()}
                )
                print(
                    f"  after {total / GiB:.2f} GiB: RSS {samples[-1]['rss_mb']} MB (peak {samples[-1]['hwm_mb']} MB)",
                    flush=True,
                )
            output_seconds = time.monotonic() - t0
            sample("after_output")
        finally:
            await channel.close()
        bare = bare_rss_mb()
        first, last = samples[1]["rss_mb"], samples[-1]["rss_mb"]
        growth = round(last - first, 1)
        peak = max(s_["hwm_mb"] for s_ in samples)
        result.data = {
            "phases": phases,
            "samples": samples,
            "bare_python_grpc_rss_mb": bare,
            "growth_first_to_last_gib_mb": growth,
            "output_seconds": round(output_seconds, 1),
            "server_peak_rss_mb": peak,
        }
        fin_key = f"finished_{n_finished}"
        rows = [
            ("idle", "idle"),
            (fin_key, f"{n_finished} finished jobs"),
            ("running_100", "100 running jobs"),
            ("after_output", f"after {total / GiB:.0f} GiB of output"),
        ]
        for key, label in rows:
            v = phases[key]["rss_mb"]
            result.check(
                f"RSS {label}",
                v,
                "MB",
                baseline=bare,
                baseline_name="bare python+grpc",
                target=f"< {TARGET_MB:.0f} MB",
                ok=v < TARGET_MB,
            )
        result.check(
            "peak RSS (VmHWM) over the whole run",
            peak,
            "MB",
            baseline=bare,
            baseline_name="bare python+grpc",
            target=f"< {TARGET_MB:.0f} MB",
            ok=peak < TARGET_MB,
        )
        result.check(
            "RSS growth from the first to the last GiB",
            growth,
            "MB",
            target=f"no growth (< {GROWTH_LIMIT_MB:g} MB)",
            ok=growth < GROWTH_LIMIT_MB,
        )

    return run_server_bench("footprint", opts, body, raise_quotas=OUTPUT_QUOTAS)
