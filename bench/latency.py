"""Latency: Start, Get and Stop over one reused mTLS channel (p50, p99 of 1,000 calls each), and `jobctl get` as a
fresh process (p50 of 20) vs a bare `python -c 'import grpc'` in the same run.

Targets: Start p50 <= 10 ms including the cgroup setup and the durable record; Get p50 <= 1 ms; `jobctl get` <= 1.3x
the bare import. Baselines: a no-op RPC on the same channel (grpc.health.v1 Check: TLS, HTTP/2 and protobuf, no jobsvc
code) for the RPCs, and the local floor of what Start must do (mkdir the groups, spawn, fsync a record) measured here.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import BIN, KEEP_QUOTAS, RUNNING_QUOTAS, Options, Result, Server, dist_ms, pb, run_server_bench, stub

START_TARGET_MS = 10.0
GET_TARGET_MS = 1.0
JOBCTL_TARGET_RATIO = 1.3


async def _timed(fn: Any, requests: list[Any]) -> tuple[list[float], list[Any]]:
    times, replies = [], []
    for req in requests:
        t0 = time.perf_counter()
        reply = await fn(req)
        times.append(time.perf_counter() - t0)
        replies.append(reply)
    return times, replies


def _run_n(cmd: list[str], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        out.append(time.perf_counter() - t0)
    return out


def start_floor(workdir: Path, n: int) -> dict[str, Any]:
    """What Start cannot avoid, done directly: mkdir/rmdir the job's groups, spawn a process, fsync a record."""
    from jobsvc.cgroups.v1 import REQUIRED, find_hierarchies

    own = find_hierarchies(Path("/proc/self"))
    parents = list(dict.fromkeys(own[c] / f"jobsvc-bench-floor-{os.getpid()}" for c in REQUIRED if c in own))
    mk, spawn, fsync = [], [], []
    try:
        for p in parents:
            p.mkdir(exist_ok=True)
        for i in range(n):
            t0 = time.perf_counter()
            for p in parents:
                (p / str(i)).mkdir()
            mk.append(time.perf_counter() - t0)
            for p in parents:
                (p / str(i)).rmdir()
            t0 = time.perf_counter()
            pid = os.posix_spawn("/bin/true", ["true"], {})
            os.waitpid(pid, 0)
            spawn.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            tmp, path = workdir / ".floor.tmp", workdir / "floor.json"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, b'{"id": "x"}' * 40)
            os.fsync(fd)
            os.close(fd)
            os.rename(tmp, path)
            dfd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dfd)
            os.close(dfd)
            fsync.append(time.perf_counter() - t0)
    finally:
        for p in parents:
            for child in p.iterdir():
                if child.is_dir():
                    child.rmdir()
            p.rmdir()
    m, s, f = (statistics.median(x) * 1000 for x in (mk, spawn, fsync))
    return {
        "groups": len(parents),
        "mkdir_groups_ms_p50": round(m, 3),
        "posix_spawn_wait_true_ms_p50": round(s, 3),
        "atomic_fsync_write_ms_p50": round(f, 3),
        "sum_ms_p50": round(m + s + f, 3),
    }


def import_profile(server: Server, job_id: str) -> list[tuple[str, float]]:
    """The slowest top-level imports of one `jobctl get` (python -X importtime), cumulative ms."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(BIN / "jobctl"), *server.jobctl("get", "--id", job_id)[1:]],
        capture_output=True,
        text=True,
        check=False,
    )
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(3)) <= 3:  # top level only (the indent shows nesting)
            rows.append((m.group(4), round(int(m.group(2)) / 1000, 1)))
    return sorted(rows, key=lambda r: -r[1])[:12]


def run(opts: Options) -> Result:
    n = 200 if opts.quick else 1000
    n_proc = 10 if opts.quick else 20

    async def body(server: Server, result: Result) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        result.params = {
            "calls": n,
            "process_runs": n_proc,
            "start_command": "sleep 3600",
            "channel": "one grpc.aio mTLS channel, calls one after another",
        }
        channel = server.aio_channel()
        s, health = stub(channel), health_pb2_grpc.HealthStub(channel)
        P = pb()
        try:
            for _ in range(20):  # warm-up: the channel, the helper, the page cache
                job = await s.Start(P.StartRequest(argv=[b"true"]))
                await s.Wait(P.GetRequest(id=job.id))
                await s.Get(P.GetRequest(id=job.id))
                await health.Check(health_pb2.HealthCheckRequest(service=""))
            noop, _ = await _timed(health.Check, [health_pb2.HealthCheckRequest(service="")] * n)
            start, jobs = await _timed(s.Start, [P.StartRequest(argv=[b"sleep", b"3600"])] * n)
            ids = [j.id for j in jobs]
            get_running, _ = await _timed(s.Get, [P.GetRequest(id=i) for i in ids])
            stop, stopped = await _timed(s.Stop, [P.StopRequest(id=i) for i in ids])
            get_ended, _ = await _timed(s.Get, [P.GetRequest(id=i) for i in ids])
            noop_after, _ = await _timed(health.Check, [health_pb2.HealthCheckRequest(service="")] * n)
            bad = [j for j in stopped if j.status != P.JOB_STATUS_STOPPED]
            if bad:
                result.note(f"{len(bad)} Stop calls did not end in STOPPED")
            last_id = ids[-1]
        finally:
            await channel.close()
        floor = start_floor(server.workdir, 100 if opts.quick else 200)
        # jobctl get as a fresh process vs a bare `python -c 'import grpc'`, interleaved (noise hits both alike)
        jobctl_cmd = server.jobctl("get", "--id", last_id)
        bare_cmd = [sys.executable, "-c", "import grpc"]
        _run_n(jobctl_cmd, 2)
        _run_n(bare_cmd, 2)
        jobctl_t, bare_t = [], []
        for _ in range(n_proc):
            jobctl_t += _run_n(jobctl_cmd, 1)
            bare_t += _run_n(bare_cmd, 1)
        k = max(5, n_proc // 2)
        minimal = (
            "import sys, grpc\n"
            "from jobsvc._pb import jobs_pb2, jobs_pb2_grpc\n"
            "ca, cert, key, target, job = sys.argv[1:6]\n"
            "pem = [open(p, 'rb').read() for p in (ca, key, cert)]\n"
            "creds = grpc.ssl_channel_credentials(*pem)\n"
            "with grpc.secure_channel(target, creds) as ch:\n"
            "    print(jobs_pb2_grpc.JobServiceStub(ch).Get(jobs_pb2.GetRequest(id=job), timeout=10).status)\n"
            "sys.stdout.flush()\n"
            "import os; os._exit(0)  # as jobctl leaves: without the interpreter's teardown\n"
        )
        minimal_cmd = [
            sys.executable,
            "-c",
            minimal,
            str(server.pki / "ca.pem"),
            str(server.pki / "alice.pem"),
            str(server.pki / "alice-key.pem"),
            server.target,
            last_id,
        ]
        # what any click CLI over the generated stubs pays before doing anything (the interpreter's teardown included)
        imports_cmd = [sys.executable, "-c", "import grpc, click, jobsvc._pb.jobs_pb2_grpc"]
        minimal_t, bare2_t, imports_t = [], [], []
        for _ in range(n_proc):
            minimal_t += _run_n(minimal_cmd, 1)
            imports_t += _run_n(imports_cmd, 1)
            bare2_t += _run_n(bare_cmd, 1)
        parts = {
            "python -c pass": _run_n([sys.executable, "-c", "pass"], k),
            "import jobctl.main (the CLI module)": _run_n([sys.executable, "-c", "import jobctl.main"], k),
            "import grpc + the stubs": _run_n([sys.executable, "-c", "import grpc, jobsvc._pb.jobs_pb2_grpc"], k),
            "jobctl --help": _run_n(server.jobctl("--help"), k),
        }
        noop_all = noop + noop_after
        d = {
            "noop_rpc_ms": dist_ms(noop_all),
            "start_ms": dist_ms(start),
            "get_running_ms": dist_ms(get_running),
            "get_ended_ms": dist_ms(get_ended),
            "stop_ms": dist_ms(stop),
            "start_floor": floor,
            "jobctl_get_ms": dist_ms(jobctl_t),
            "bare_import_grpc_ms": dist_ms(bare_t),
            "process_breakdown_p50_ms": {k2: round(statistics.median(v) * 1000, 1) for k2, v in parts.items()},
            "jobctl_get_import_profile_ms": import_profile(server, last_id),
            "minimal_client_get_ms": dist_ms(minimal_t),
            "minimal_client_bare_import_ms": dist_ms(bare2_t),
            "imports_grpc_stubs_click_ms": dist_ms(imports_t),
        }
        result.data = d
        base = d["noop_rpc_ms"]["p50"]
        result.check(
            "Start p50",
            d["start_ms"]["p50"],
            "ms",
            baseline=base,
            baseline_name="no-op RPC",
            target=f"<= {START_TARGET_MS:g} ms",
            ok=d["start_ms"]["p50"] <= START_TARGET_MS,
        )
        result.check(
            "Start p50 vs local floor",
            d["start_ms"]["p50"],
            "ms",
            baseline=floor["sum_ms_p50"],
            baseline_name="mkdir+spawn+fsync",
        )
        result.check(
            "Start p99", d["start_ms"]["p99"], "ms", baseline=d["noop_rpc_ms"]["p99"], baseline_name="no-op RPC"
        )
        result.check(
            "Get p50 (running job)",
            d["get_running_ms"]["p50"],
            "ms",
            baseline=base,
            baseline_name="no-op RPC",
            target=f"<= {GET_TARGET_MS:g} ms",
            ok=d["get_running_ms"]["p50"] <= GET_TARGET_MS,
        )
        result.check(
            "Get p99 (running job)",
            d["get_running_ms"]["p99"],
            "ms",
            baseline=d["noop_rpc_ms"]["p99"],
            baseline_name="no-op RPC",
        )
        result.check(
            "Get p50 (ended job)",
            d["get_ended_ms"]["p50"],
            "ms",
            baseline=base,
            baseline_name="no-op RPC",
            target=f"<= {GET_TARGET_MS:g} ms",
            ok=d["get_ended_ms"]["p50"] <= GET_TARGET_MS,
        )
        result.check("Stop p50", d["stop_ms"]["p50"], "ms", baseline=base, baseline_name="no-op RPC")
        result.check("Stop p99", d["stop_ms"]["p99"], "ms", baseline=d["noop_rpc_ms"]["p99"], baseline_name="no-op RPC")
        jr = round(d["jobctl_get_ms"]["p50"] / d["bare_import_grpc_ms"]["p50"], 3)
        result.check(
            "jobctl get, fresh process, p50",
            d["jobctl_get_ms"]["p50"],
            "ms",
            baseline=d["bare_import_grpc_ms"]["p50"],
            baseline_name="python -c 'import grpc'",
            ratio=jr,
            target=f"ratio <= {JOBCTL_TARGET_RATIO}",
            ok=jr <= JOBCTL_TARGET_RATIO,
        )
        result.check(
            "floor: minimal Python client Get (grpc + stubs + one call + os._exit)",
            d["minimal_client_get_ms"]["p50"],
            "ms",
            baseline=d["minimal_client_bare_import_ms"]["p50"],
            baseline_name="python -c 'import grpc'",
        )
        result.check(
            "imports alone: grpc + stubs + click (no call)",
            d["imports_grpc_stubs_click_ms"]["p50"],
            "ms",
            baseline=d["minimal_client_bare_import_ms"]["p50"],
            baseline_name="python -c 'import grpc'",
        )
        print(
            f"  no-op RPC p50 {base} ms; Start p50 {d['start_ms']['p50']} ms (floor {floor['sum_ms_p50']} ms); "
            f"Get p50 {d['get_running_ms']['p50']} ms; Stop p50 {d['stop_ms']['p50']} ms; jobctl get "
            f"{d['jobctl_get_ms']['p50']} ms vs import grpc {d['bare_import_grpc_ms']['p50']} ms",
            flush=True,
        )
        print(f"  process breakdown (p50 ms): {d['process_breakdown_p50_ms']}", flush=True)

    return run_server_bench("latency", opts, body, raise_quotas={**RUNNING_QUOTAS, **KEEP_QUOTAS})
