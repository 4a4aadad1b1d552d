"""Stream fan-out: 1, 10, 100 and 1,000 concurrent clients each stream the whole output of a finished job and of a
live job; 1-10 clients are real `jobctl stream` processes, 100-1,000 an asyncio client in this process (one TCP
connection per client). Baselines: the same bytes read straight from the job's output files (the physical limit),
and a peer: a bare grpc.aio server with the same mTLS streaming the same bytes to the same asyncio clients.

Targets (2 cores, client and server on one machine): >= 600 MB/s aggregate at 10-100 clients, >= 400 MB/s for one
client, and 1,000 clients all served to the end. Rates here are MiB/s; the targets are in MB/s and are checked in
MB/s (400 MB/s = 381.5 MiB/s).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import resource
import select
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    STREAM_QUOTAS,
    MiB,
    Options,
    Result,
    Server,
    aio_channel,
    cpu_seconds,
    mbps,
    pb,
    run_server_bench,
    self_cpu_seconds,
    start_job,
    stub,
    timed_threads,
    wait_job,
)
from bench.peer import open_stream as peer_stream

CLIENTS = (1, 10, 100, 1000)
JOBCTL_MAX = 10  # up to this many clients are jobctl processes; above, the in-process asyncio client
GO = b"go"  # a live job prints this, then blocks on a FIFO until every client is attached
TARGETS = {1: 400.0, 10: 600.0, 100: 600.0}  # MB/s, as issue 7 states them
MB_PER_MIB = 1.048576


@dataclass
class Stream:
    started: float  # the call was issued / the process started
    first: float | None  # first byte arrived
    ended: float
    nbytes: int
    error: str | None = None
    cpu_s: float = 0.0  # a jobctl process's total CPU time (from wait4)


# -- jobs -------------------------------------------------------------------------------------------------------------


class Gate:
    """A FIFO the live job blocks on: opening it for writing and writing a line releases the job."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.mkfifo(path)
        os.chmod(path, 0o666)  # jobs may run as a transient uid

    def release(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:  # ENXIO: the job has not opened its end yet
                if e.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise
                time.sleep(0.001)
        os.write(fd, b"x\n")
        os.close(fd)
        self.path.unlink()


async def finished_job(s: Any, size: int) -> str:
    job = await start_job(s, "head", "-c", str(size), "/dev/zero")
    final = await wait_job(s, job.id)
    assert final.output_bytes == size, final
    return str(job.id)


async def live_job(s: Any, size: int, gate: Gate) -> str:
    script = f"printf {GO.decode()}; read x < {gate.path}; exec head -c {size} /dev/zero"
    job = await start_job(s, "sh", "-c", script)
    return str(job.id)


# -- clients ----------------------------------------------------------------------------------------------------------


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _drain_pipe(
    proc: subprocess.Popen[bytes], started: float, out: list[Stream], i: int, attached: threading.Semaphore
) -> None:
    """Count a jobctl's stdout bytes without copying them through Python (splice into /dev/null)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    devnull = os.open(os.devnull, os.O_WRONLY)
    first, got, signalled = None, 0, False
    try:
        while True:
            n = os.splice(fd, devnull, 1 << 20)
            if n == 0:
                break
            if first is None:
                first = time.perf_counter()
            got += n
            if not signalled and got >= len(GO):
                signalled = True
                attached.release()
    finally:
        os.close(devnull)
        if not signalled:
            attached.release()
    ended = time.perf_counter()
    _, status, usage = os.wait4(proc.pid, 0)
    code = proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
    error = None if code == 0 else f"exit {code}: {err[-300:]}"
    out[i] = Stream(started, first, ended, got, error, usage.ru_utime + usage.ru_stime)


def _server_bytes_sent(server: Server) -> int:
    """TCP payload bytes the server has sent on its established connections (TLS records included), from ss."""
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{server.port} )"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return sum(int(m) for m in re.findall(r"bytes_sent:(\d+)", out))


def jobctl_clients(
    server: Server, job_id: str, n: int, gate: Gate | None, raw: bool = False
) -> tuple[list[Stream], float, int, float, float]:
    """n `jobctl stream --id` processes; returns their streams, the time the measured window opened, the bytes the
    server had sent before it, the CPU seconds the processes used inside the window and the server's CPU time when
    it opened. raw=True runs bench/rawclient.py (the sync stub alone) instead of jobctl.

    A live job is released once every client has its first bytes. For a finished job, each client's stdout pipe is
    the gate: the processes start (importing grpc, handshaking: about 0.2 s of CPU each), receive, and block writing
    their first message until all of them are ready; then every pipe is drained at once. So the window measures
    concurrent streaming, not staggered process start-up (reported separately as wall_incl_process_start_s).
    """
    results: list[Stream] = [Stream(0, None, 0, 0, "not run")] * n
    attached = threading.Semaphore(0)
    procs, threads = [], []
    sent0 = _server_bytes_sent(server)
    for i in range(n):
        started = time.perf_counter()
        cmd = (
            [sys.executable, "-m", "bench.rawclient", server.target, str(server.pki), job_id]
            if raw
            else server.jobctl("stream", "--id", job_id)
        )
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        procs.append((proc, started))
        if gate is not None:
            t = threading.Thread(target=_drain_pipe, args=(proc, started, results, i, attached), daemon=True)
            t.start()
            threads.append(t)
    if gate is not None:
        for _ in range(n):
            if not attached.acquire(timeout=120):
                raise RuntimeError("jobctl clients did not attach to the live job within 120 s")
        pre = _server_bytes_sent(server) - sent0
        t0 = time.perf_counter()
        cpu_at_t0 = [cpu_seconds(p.pid) for p, _ in procs]
        server_cpu_t0 = server.cpu_seconds()
        gate.release()
    else:
        poller = select.poll()
        for proc, _ in procs:
            assert proc.stdout is not None
            poller.register(proc.stdout.fileno(), select.POLLIN)
        waiting = {proc.stdout.fileno() for proc, _ in procs if proc.stdout is not None}
        deadline = time.monotonic() + 120
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError("jobctl clients did not start streaming within 120 s")
            for fd, _ in poller.poll(1000):
                poller.unregister(fd)
                waiting.discard(fd)
        time.sleep(0.05)  # each client now blocks on its full pipe
        pre = _server_bytes_sent(server) - sent0
        t0 = time.perf_counter()
        cpu_at_t0 = [cpu_seconds(p.pid) for p, _ in procs]
        server_cpu_t0 = server.cpu_seconds()
        for i, (proc, started) in enumerate(procs):
            t = threading.Thread(target=_drain_pipe, args=(proc, started, results, i, attached), daemon=True)
            t.start()
            threads.append(t)
    for t in threads:
        t.join(600)
    streaming_cpu = sum(r.cpu_s for r in results) - sum(cpu_at_t0)
    return results, t0, pre, streaming_cpu, server_cpu_t0


async def open_channels(server: Server, n: int, target: str | None = None) -> list[Any]:
    """n channels, each with its own TCP+TLS connection, to the server (or to target with the same credentials)."""
    creds = server.credentials()
    channels = [aio_channel(target or server.target, creds, own_connection=True) for _ in range(n)]
    for i in range(0, n, 100):  # handshakes in batches, so none of them times out under load
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels[i : i + 100])), 120)
    return channels


def jobsvc_stream(job_id: str) -> Callable[[Any], Any]:
    request = pb().StreamRequest(id=job_id)
    return lambda channel: stub(channel).Stream(request)


async def aio_clients(
    channels: list[Any], open_call: Callable[[Any], Any], gate: Gate | None
) -> tuple[list[Stream], float]:
    """One stream per channel, all at once; counts bytes per client (messages: StreamResponse or raw bytes)."""
    n = len(channels)
    attached = 0
    all_attached = asyncio.Event()

    async def one(channel: Any) -> Stream:
        nonlocal attached
        started = time.perf_counter()
        first, got, signalled, error = None, 0, False, None
        try:
            async for msg in open_call(channel):
                if first is None:
                    first = time.perf_counter()
                got += len(msg) if isinstance(msg, bytes) else len(msg.data)
                if not signalled and got >= len(GO):
                    signalled = True
                    attached += 1
                    if attached == n:
                        all_attached.set()
        except Exception as e:  # a failed client is a result, not a crash
            details = e.details() if hasattr(e, "details") else str(e)
            error = f"{type(e).__name__}: {details}"
        finally:
            if not signalled:
                attached += 1
                if attached == n:
                    all_attached.set()
        return Stream(started, first, time.perf_counter(), got, error)

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(one(c)) for c in channels]
    if gate is not None:
        await asyncio.wait_for(all_attached.wait(), 120)
        t0 = time.perf_counter()
        gate.release()
    streams = await asyncio.gather(*tasks)
    return list(streams), t0


# -- baseline ---------------------------------------------------------------------------------------------------------


def read_files_rate(paths: list[Path], repeats: int, threads: int | None = None) -> tuple[float, int]:
    """Read the files `repeats` times with 256 KiB reads into a reused buffer, one thread per core: (s, bytes)."""
    threads = threads or min(os.cpu_count() or 1, repeats)
    size = sum(p.stat().st_size for p in paths)
    shares = [repeats // threads + (1 if i < repeats % threads else 0) for i in range(threads)]

    def work(k: int) -> None:
        buf = bytearray(256 * 1024)
        for _ in range(k):
            for p in paths:
                fd = os.open(p, os.O_RDONLY)
                try:
                    while os.readv(fd, [buf]):
                        pass
                finally:
                    os.close(fd)

    work(1)  # page cache warm
    return timed_threads(work, shares), size * repeats


# -- the benchmark ----------------------------------------------------------------------------------------------------


def summarize(
    kind: str,
    client: str,
    n: int,
    size: int,
    streams: list[Stream],
    t0: float,
    live: bool,
    baseline: float,
    server_cpu: float,
    bench_cpu: float,
    pre_sent: int = 0,
) -> dict[str, Any]:
    """pre_sent: bytes the server sent before the window opened (gated jobctl clients hold their first messages)."""
    expected = size + (len(GO) if live else 0)
    served = sum(1 for s in streams if s.error is None and s.nbytes == expected)
    ends = [s.ended for s in streams]
    window = max(ends) - t0
    total = sum(s.nbytes for s in streams)
    counted = max(total - pre_sent, 0)
    per_client = []
    for s in streams:
        begin = s.started if client == "asyncio" and not live else t0
        per_client.append(mbps(max(s.nbytes - pre_sent / n, 0), max(s.ended - begin, 1e-9)))
    errors = sorted({s.error for s in streams if s.error})
    return {
        "kind": kind,
        "client": client,
        "clients": n,
        "bytes_per_client": expected,
        "served_to_end": served,
        "errors": errors[:5],
        "window_s": round(window, 4),
        "bytes_sent_before_window": pre_sent,
        "aggregate_mib_s": mbps(counted, window),
        "per_client_mib_s_median": round(statistics.median(per_client), 1),
        "per_client_mib_s_min": round(min(per_client), 1),
        "per_client_mib_s_max": round(max(per_client), 1),
        "wall_incl_process_start_s": round(max(ends) - min(s.started for s in streams), 4),
        "baseline_mib_s": baseline,
        "ratio_to_baseline": round(mbps(counted, window) / baseline, 3) if baseline else None,
        "server_cpu_s": round(server_cpu, 3),
        "bench_client_cpu_s": round(bench_cpu, 3),
        "server_cpu_s_per_gib": round(server_cpu / (total / (1024 * MiB)), 3) if total else None,
    }


@contextlib.contextmanager
def peer_server(server: Server) -> Iterator[tuple[str, int]]:
    """The bare grpc.aio peer (bench/peer.py) in its own process: (target, pid)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.peer", str(server.pki)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("peer listening on "):
            raise RuntimeError(f"the peer did not start: {line!r}")
        yield line.strip().rsplit(" ", 1)[1], proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _print_row(row: dict[str, Any]) -> None:
    print(
        f"  {row['clients']:>4} x {row['client']:<7} {row['kind']:<8}: aggregate {row['aggregate_mib_s']:>7} MiB/s, "
        f"per client {row['per_client_mib_s_median']:>7} MiB/s (median), served {row['served_to_end']}/"
        f"{row['clients']}, server CPU {row['server_cpu_s']} s, client CPU {row['bench_client_cpu_s']} s"
        + (f", jobctl CPU in window {row['jobctl_cpu_in_window_s']} s" if "jobctl_cpu_in_window_s" in row else ""),
        flush=True,
    )


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The repetition with the median aggregate, with every repetition's aggregate and the worst served count."""
    ranked = sorted(rows, key=lambda r: r["aggregate_mib_s"])
    row = dict(ranked[len(ranked) // 2])
    row["aggregate_mib_s_reps"] = [r["aggregate_mib_s"] for r in rows]
    row["served_to_end"] = min(r["served_to_end"] for r in rows)
    row["errors"] = sorted({e for r in rows for e in r["errors"]})[:5]
    return row


def run(opts: Options) -> Result:
    reps = 1 if opts.quick else 3
    total = 128 * MiB if opts.quick else 256 * MiB
    min_each = 512 * 1024 if opts.quick else MiB
    gate_dir = opts.scratch / "fanout-gates"

    async def body(server: Server, result: Result) -> None:
        result.params = {
            "clients": CLIENTS,
            "total_bytes_per_run": total,
            "min_bytes_per_client": min_each,
            "jobctl_up_to": JOBCTL_MAX,
            "asyncio_connections": "one TCP+TLS connection per client",
            "extra": "the asyncio client also runs at 1 and 10 clients, to separate client cost from server cost",
            "repetitions": reps,
            "reported": "the repetition with the median aggregate (all aggregates in aggregate_mib_s_reps)",
            "raw": "bench/rawclient.py: the generated sync stub writing each message to stdout, run like jobctl "
            "(1 and 10 processes, finished job): the floor of a Python client process",
            "per_client_rate": "jobctl, finished job: bytes / (end - window start), where the window opens once "
            "every jobctl has started and is blocked on its stdout pipe (bytes the server sent before are not "
            "counted); asyncio: bytes / (end - call); live job: bytes / (end - job release)",
            "baselines": "file read: the same bytes read from the job's output files (2 threads, 256 KiB reads); "
            "peer: a bare grpc.aio server (bench/peer.py), same mTLS, streaming the same bytes in messages of "
            "jobsvc's sizes (chunk_size_for) to the same asyncio clients",
        }
        gate_dir.mkdir(parents=True, exist_ok=True)
        control = server.aio_channel()
        s = stub(control)

        async def measure(
            client: str, kind: str, n: int, size: int, fin_id: str, channels: list[Any], baseline: float
        ) -> dict[str, Any]:
            gate = Gate(gate_dir / f"{n}-{client}-{kind}") if kind == "live" else None
            job_id = await live_job(s, size, gate) if gate else fin_id
            cpu0, me0, kids0 = server.cpu_seconds(), self_cpu_seconds(), children_cpu_seconds()
            pre = 0
            if client in ("jobctl", "raw"):
                streams, t0, pre, jobctl_cpu, cpu0 = await asyncio.to_thread(
                    jobctl_clients, server, job_id, n, gate, client == "raw"
                )
                pre = 0 if gate else pre  # server CPU and bytes: inside the window only
            else:
                streams, t0 = await aio_clients(channels, jobsvc_stream(job_id), gate)
            cpu, me = server.cpu_seconds() - cpu0, self_cpu_seconds() - me0
            row = summarize(kind, client, n, size, streams, t0, gate is not None, baseline, cpu, me, pre)
            if client in ("jobctl", "raw"):
                row["jobctl_processes_cpu_s"] = round(children_cpu_seconds() - kids0, 3)
                row["jobctl_cpu_in_window_s"] = round(jobctl_cpu, 3)
            if gate:
                await wait_job(s, job_id)
                server.drop_output(job_id)
            return row

        runs: list[dict[str, Any]] = []
        peer_runs: dict[int, dict[str, Any]] = {}
        try:
            with peer_server(server) as (peer_target, peer_pid):
                for n in CLIENTS:
                    size = max(total // n, min_each)
                    fin_id = await finished_job(s, size)
                    seconds, nbytes = read_files_rate(server.job_output_files(fin_id), n)
                    baseline = mbps(nbytes, seconds)
                    clients = ["jobctl", "raw", "asyncio"] if n <= JOBCTL_MAX else ["asyncio"]
                    for client in clients:
                        channels = await open_channels(server, n) if client == "asyncio" else []
                        try:
                            for kind in ("finished",) if client == "raw" else ("finished", "live"):
                                reps_rows = [
                                    await measure(client, kind, n, size, fin_id, channels, baseline)
                                    for _ in range(reps)
                                ]
                                row = median_row(reps_rows)
                                runs.append(row)
                                _print_row(row)
                        finally:
                            await asyncio.gather(*(c.close() for c in channels))
                    server.drop_output(fin_id)
                    result.data.setdefault("rss_mb_after", {})[n] = server.rss_mb()
                    # the peer: the same bytes to the same kind of clients, without jobsvc
                    channels = await open_channels(server, n, peer_target)
                    try:
                        prows = []
                        for _ in range(reps):
                            cpu0, me0 = cpu_seconds(peer_pid), self_cpu_seconds()
                            streams, t0 = await aio_clients(channels, lambda c, k=size: peer_stream(c, k), None)
                            cpu, me = cpu_seconds(peer_pid) - cpu0, self_cpu_seconds() - me0
                            prows.append(summarize("finished", "peer", n, size, streams, t0, False, baseline, cpu, me))
                    finally:
                        await asyncio.gather(*(c.close() for c in channels))
                    peer_runs[n] = median_row(prows)
                    _print_row(peer_runs[n])
        finally:
            await control.close()
        for row in runs:
            peer = peer_runs.get(row["clients"])
            if peer:
                row["peer_mib_s"] = peer["aggregate_mib_s"]
                row["ratio_to_peer"] = round(row["aggregate_mib_s"] / peer["aggregate_mib_s"], 3)
        result.data["runs"] = runs
        result.data["peer_runs"] = list(peer_runs.values())
        result.data["server_hwm_mb"] = server.hwm_mb()
        for row in runs:
            n, kind, client = row["clients"], row["kind"], row["client"]
            if (client == "jobctl") != (n <= JOBCTL_MAX):
                continue  # the extra asyncio runs at 1-10 clients are in the JSON, not the table
            label = f"{n} client{'s' if n > 1 else ''}, {kind} job ({client})"
            target = TARGETS.get(n)
            result.check(
                f"{label}: aggregate",
                row["aggregate_mib_s"],
                "MiB/s",
                baseline=row["baseline_mib_s"],
                baseline_name="file read",
                target=f">= {target:.0f} MB/s ({target / MB_PER_MIB:.0f} MiB/s)" if target else "",
                ok=row["aggregate_mib_s"] * MB_PER_MIB >= target if target else None,
            )
            result.check(f"{label}: per client (median)", row["per_client_mib_s_median"], "MiB/s")
            if n == 1000:
                result.check(
                    f"{label}: served to the end",
                    row["served_to_end"],
                    f"of {n}",
                    target="all",
                    ok=row["served_to_end"] == n,
                )
        for n, prow in peer_runs.items():
            mine = next(
                (r for r in runs if r["clients"] == n and r["client"] == "asyncio" and r["kind"] == "finished"), None
            )
            result.check(
                f"{n} client{'s' if n > 1 else ''}, finished job (asyncio) vs bare grpc.aio peer",
                mine["aggregate_mib_s"] if mine else None,
                "MiB/s",
                baseline=prow["aggregate_mib_s"],
                baseline_name="peer",
            )

        for raw in (r for r in runs if r["client"] == "raw"):
            n = raw["clients"]
            mine = next(r for r in runs if r["clients"] == n and r["client"] == "jobctl" and r["kind"] == "finished")
            result.check(
                f"{n} client{'s' if n > 1 else ''}, finished job (jobctl) vs minimal Python client processes",
                mine["aggregate_mib_s"],
                "MiB/s",
                baseline=raw["aggregate_mib_s"],
                baseline_name="raw stub",
            )

    return run_server_bench("fanout", opts, body, raise_quotas=STREAM_QUOTAS)
