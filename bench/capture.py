"""Capture: a job writing as fast as it can (`head -c 1G /dev/zero`), Start to finished, vs the same command
redirected to a file on the state dir's filesystem. Target: ratio <= 1.5."""

from __future__ import annotations

import statistics
import subprocess
import time
from typing import Any

from bench.common import GiB, MiB, Options, Result, Server, mbps, run_server_bench, start_job, stub, wait_job

TARGET_RATIO = 1.5


def _baseline_once(server: Server, size: int) -> float:
    out = server.workdir / "baseline.out"
    with out.open("wb") as f:
        t0 = time.perf_counter()
        subprocess.run(["head", "-c", str(size), "/dev/zero"], stdout=f, check=True)
        elapsed = time.perf_counter() - t0
    if out.stat().st_size != size:
        raise RuntimeError(f"baseline wrote {out.stat().st_size} bytes, not {size}")
    out.unlink()
    return elapsed


async def _jobsvc_once(server: Server, s: Any, size: int) -> tuple[float, float, float]:
    cpu0, helper0 = server.cpu_seconds(), server.helper_cpu_seconds()
    t0 = time.perf_counter()
    job = await start_job(s, "head", "-c", str(size), "/dev/zero")
    final = await wait_job(s, job.id)
    elapsed = time.perf_counter() - t0
    cpu, helper = server.cpu_seconds() - cpu0, server.helper_cpu_seconds() - helper0
    if final.output_bytes != size or final.exit_code != 0:
        raise RuntimeError(f"job wrote {final.output_bytes} bytes (exit {final.exit_code}), not {size}")
    server.drop_output(job.id)
    return elapsed, cpu, helper


def run(opts: Options) -> Result:
    size = 256 * MiB if opts.quick else GiB
    reps = 2 if opts.quick else 3

    async def body(server: Server, result: Result) -> None:
        result.params = {
            "bytes": size,
            "repetitions": reps,
            "command": f"head -c {size} /dev/zero",
            "baseline": "the same command, stdout redirected to a file next to the state dir",
        }
        channel = server.aio_channel()
        s = stub(channel)
        try:
            # warm-up: page cache, the spawn helper, the channel
            _baseline_once(server, 64 * MiB)
            await _jobsvc_once(server, s, 64 * MiB)
            base, svc, cpu, helper = [], [], [], []
            for i in range(reps):  # interleaved, so drift on a noisy machine hits both sides alike
                base.append(_baseline_once(server, size))
                t, c, h = await _jobsvc_once(server, s, size)
                svc.append(t)
                cpu.append(c)
                helper.append(h)
                print(
                    f"  rep {i + 1}/{reps}: baseline {base[-1]:.3f} s, jobsvc {t:.3f} s (server CPU {c:.2f} s)",
                    flush=True,
                )
        finally:
            await channel.close()
        b, j = statistics.median(base), statistics.median(svc)
        ratio = round(j / b, 3)
        result.data = {
            "baseline_seconds": [round(x, 4) for x in base],
            "jobsvc_seconds": [round(x, 4) for x in svc],
            "baseline_median_s": round(b, 4),
            "jobsvc_median_s": round(j, 4),
            "baseline_mb_s": mbps(size, b),
            "jobsvc_mb_s": mbps(size, j),
            "server_cpu_seconds": [round(x, 3) for x in cpu],
            "helper_cpu_seconds": [round(x, 3) for x in helper],
            "server_cpu_s_per_gib": round(statistics.median(cpu) / (size / GiB), 3),
        }
        result.check(
            "capture wall time",
            round(j, 3),
            "s",
            baseline=round(b, 3),
            baseline_name="head > file",
            ratio=ratio,
            target=f"ratio <= {TARGET_RATIO}",
            ok=ratio <= TARGET_RATIO,
        )
        result.check("capture rate", mbps(size, j), "MiB/s", baseline=mbps(size, b), baseline_name="head > file")

    return run_server_bench("capture", opts, body)
