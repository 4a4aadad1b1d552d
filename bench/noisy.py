"""Noisy neighbour: Get latency on a running job and a second job's live stream rate while another job writes to
its output at disk speed for 20 s (`dd if=/dev/zero bs=1M` to stdout, captured into the state dir on the real disk),
against the same figures with no writer, in the same run.

The stall this measures is the kernel's dirty-page throttling (`balance_dirty_pages`): once the state disk cannot
keep up, every thread that dirties its page cache is made to wait. The per-job and total output caps are raised so
the writer's output stays on disk (retention unlinking old segments would throw their dirty pages away instead).

Targets (issue 19): Get p99 with the writer <= 3x without it; the other job's stream >= 0.8 of its rate alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from bench.common import MiB, Options, Result, Server, dist_ms, mbps, pb, run_server_bench, start_job, stub

GET_P99_RATIO = 3.0
STREAM_RATIO = 0.8
PACE = 16 * MiB  # bytes/s the second job prints: well below the disk's rate, so the disk alone cannot slow it
BLOCK = 64 * 1024
# the paced printer keeps to a schedule (a late block is written at once), so its rate over the window is what
# the server let through, not what a stalled moment cost it
PRINTER = (
    "import os, sys, time\n"
    "rate, block, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])\n"
    "data = b'x' * (block - 1) + b'\\n'\n"
    "t0 = time.monotonic(); i = 0\n"
    "while time.monotonic() - t0 < seconds:\n"
    "    due = t0 + i * block / rate\n"
    "    now = time.monotonic()\n"
    "    if due > now: time.sleep(due - now)\n"
    "    os.write(1, data); i += 1\n"
)


def _dirty_kib() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Dirty", "Writeback"):
                out[k] = int(v.split()[0])
    return out


def _vm_dirty() -> dict[str, str]:
    out = {}
    for name in ("dirty_ratio", "dirty_background_ratio", "dirty_bytes", "dirty_background_bytes"):
        with contextlib.suppress(OSError), open(f"/proc/sys/vm/{name}") as f:
            out[name] = f.read().strip()
    return out


async def _phase(server: Server, s: Any, stream_s: Any, get_id: str, seconds: float, writer: bool) -> dict[str, Any]:
    """seconds of back-to-back Gets and one live stream, with or without a job writing at disk speed."""
    P = pb()
    printer = await start_job(s, "python3", "-c", PRINTER, str(PACE), str(BLOCK), str(seconds + 30))
    got = 0
    window: list[float] = []  # [start, end] of the measured window
    in_window = 0
    first = asyncio.get_running_loop().create_future()

    async def follow() -> None:
        nonlocal got, in_window
        async for msg in stream_s.Stream(P.StreamRequest(id=printer.id)):
            got += len(msg.data)
            if not first.done():
                first.set_result(None)
            if len(window) == 1:
                in_window += len(msg.data)

    reader = asyncio.get_running_loop().create_task(follow())
    await asyncio.wait_for(first, 30)
    await asyncio.sleep(1.0)  # the stream is live and steady before the window opens
    dd = None
    if writer:
        dd = await start_job(s, "dd", "if=/dev/zero", "bs=1M", "status=none")
    dirty_max = 0
    lat: list[float] = []
    window.append(time.perf_counter())
    end = window[0] + seconds
    next_probe = 0.0
    while True:
        t0 = time.perf_counter()
        if t0 >= end:
            break
        await s.Get(P.GetRequest(id=get_id))
        lat.append(time.perf_counter() - t0)
        if t0 >= next_probe:
            next_probe = t0 + 0.5
            dirty_max = max(dirty_max, _dirty_kib()["Dirty"])
    window.append(time.perf_counter())
    streamed = in_window
    elapsed = window[1] - window[0]
    written = 0
    if dd is not None:
        final = await s.Stop(P.StopRequest(id=dd.id, grace_seconds=0.0))
        written = final.output_bytes
    await s.Stop(P.StopRequest(id=printer.id, grace_seconds=0.0))
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await asyncio.wait_for(reader, 60)
    if dd is not None:
        server.drop_output(dd.id)
    server.drop_output(printer.id)
    return {
        "seconds": round(elapsed, 2),
        "get_ms": dist_ms(lat),
        "stream_bytes_in_window": streamed,
        "stream_mib_s": mbps(streamed, elapsed),
        "writer_bytes": written,
        "writer_mib_s": mbps(written, elapsed) if writer else None,
        "dirty_max_kib": dirty_max,
    }


def run(opts: Options) -> Result:
    seconds = 6.0 if opts.quick else 20.0

    async def body(server: Server, result: Result) -> None:
        result.params = {
            "seconds": seconds,
            "writer": "dd if=/dev/zero bs=1M status=none (stdout captured), stopped after the window",
            "stream_job": f"python3 printing {BLOCK} B blocks at {PACE // MiB} MiB/s on a schedule",
            "get": "Get of a running `sleep 3600`, back to back over one mTLS channel",
            "stream_client": "one grpc.aio client on its own connection",
            "state_dir": str(server.state_dir),
            "vm": _vm_dirty(),
        }
        channel = server.aio_channel()
        stream_channel = server.aio_channel(own_connection=True)
        s, stream_s = stub(channel), stub(stream_channel)
        P = pb()
        try:
            sleeper = await start_job(s, "sleep", "3600")
            for _ in range(200):  # warm-up: the channel and the usage reads
                await s.Get(P.GetRequest(id=sleeper.id))
            quiet = await _phase(server, s, stream_s, sleeper.id, seconds, writer=False)
            print(
                f"  no writer: Get p50 {quiet['get_ms']['p50']} p99 {quiet['get_ms']['p99']} ms, "
                f"stream {quiet['stream_mib_s']} MiB/s",
                flush=True,
            )
            noisy = await _phase(server, s, stream_s, sleeper.id, seconds, writer=True)
            print(
                f"  writer:    Get p50 {noisy['get_ms']['p50']} p99 {noisy['get_ms']['p99']} "
                f"max {noisy['get_ms']['max']} ms, stream {noisy['stream_mib_s']} MiB/s, "
                f"writer {noisy['writer_mib_s']} MiB/s, Dirty max {noisy['dirty_max_kib'] // 1024} MiB",
                flush=True,
            )
            await s.Stop(P.StopRequest(id=sleeper.id, grace_seconds=0.0))
        finally:
            await channel.close()
            await stream_channel.close()
        result.data = {"no_writer": quiet, "writer": noisy}
        q, n = quiet["get_ms"], noisy["get_ms"]
        result.check("Get p50 (running job), writer vs none", n["p50"], "ms", baseline=q["p50"], baseline_name="none")
        p99 = round(n["p99"] / q["p99"], 3)
        result.check(
            "Get p99 (running job), writer vs none",
            n["p99"],
            "ms",
            baseline=q["p99"],
            baseline_name="none",
            ratio=p99,
            target=f"ratio <= {GET_P99_RATIO:g}",
            ok=p99 <= GET_P99_RATIO,
        )
        result.check("Get max (running job), writer vs none", n["max"], "ms", baseline=q["max"], baseline_name="none")
        sr = round(noisy["stream_mib_s"] / quiet["stream_mib_s"], 3) if quiet["stream_mib_s"] else 0.0
        result.check(
            "another job's live stream, writer vs alone",
            noisy["stream_mib_s"],
            "MiB/s",
            baseline=quiet["stream_mib_s"],
            baseline_name="alone",
            ratio=sr,
            target=f"ratio >= {STREAM_RATIO:g}",
            ok=sr >= STREAM_RATIO,
        )
        result.check("the writer's capture rate", noisy["writer_mib_s"], "MiB/s")
        if noisy["dirty_max_kib"] < 256 * 1024:
            dirty = noisy["dirty_max_kib"] // 1024
            result.note(f"the page cache held at most {dirty} MiB dirty: was the disk the limit?")

    extra = ["--max-output", "1T", "--max-total-output", "1T", "--max-output-per-user", "1T"]
    return run_server_bench("noisy", opts, body, extra_args=extra)
