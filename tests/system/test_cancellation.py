"""Starts whose calls end early (cancelled, or the connection reset) over real sockets: a Start either completes
(the job is tracked, listed, stoppable, counted) or leaves nothing, however the call ends."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import time
from pathlib import Path

import grpc
from grpc import aio

from jobsvc._pb import jobs_pb2 as pb
from jobsvc._pb import jobs_pb2_grpc
from tests.system.conftest import processes_in_cgroup_named
from tests.system.server import Pki, Server, bound, start_server

SLEEP = pb.StartRequest(argv=[b"sleep", b"1000"])
STARTS = 80


def job_processes(server: Server) -> dict[int, str]:
    """pid -> job id of every process in this server's job groups (the path component after the instance)."""
    instance = (server.state_dir / "instance").read_text().strip()
    found = {}
    for pid in processes_in_cgroup_named(instance):
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            continue  # it ended meanwhile
        for line in text.splitlines():
            _, _, rest = line.partition(f"/{instance}/")
            if rest:
                found[pid] = rest.split("/")[0]
                break
    return found


def creds(keys: Pki, user: str) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(keys.ca.read_bytes(), keys.key(user).read_bytes(), keys.cert(user).read_bytes())


async def cancelled_starts(server: Server, rng: random.Random) -> None:
    """STARTS Starts, each ended after a random short delay: most by call.cancel() (RST_STREAM), some by closing
    the whole connection under them."""
    async with aio.secure_channel(server.target, creds(server.pki, "alice")) as shared:
        await asyncio.wait_for(shared.channel_ready(), 30)
        stub = jobs_pb2_grpc.JobServiceStub(shared)

        async def cancel_one() -> None:
            call = stub.Start(SLEEP, timeout=120)
            await asyncio.sleep(rng.uniform(0, 0.3))
            call.cancel()
            with contextlib.suppress(aio.AioRpcError, asyncio.CancelledError):
                await call

        async def reset_one() -> None:
            channel = aio.secure_channel(server.target, creds(server.pki, "alice"))
            await asyncio.wait_for(channel.channel_ready(), 30)
            call = jobs_pb2_grpc.JobServiceStub(channel).Start(SLEEP, timeout=120)
            await asyncio.sleep(rng.uniform(0, 0.3))
            await channel.close(grace=None)  # the connection goes away under the call
            with contextlib.suppress(aio.AioRpcError, asyncio.CancelledError):
                await call

        await asyncio.gather(*(cancel_one() if i % 4 else reset_one() for i in range(STARTS)))


def listed(server: Server) -> set[str]:
    return {j.id for j in server.stub().List(pb.ListRequest(), timeout=60).jobs}


def test_a_cancelled_start_leaves_a_tracked_job_or_nothing(tmp_path: Path, keys: Pki) -> None:
    srv = start_server(tmp_path, keys, "--max-running-per-user", str(STARTS), "--max-running-total", str(STARTS))
    try:
        seed = random.randrange(1 << 30)
        asyncio.run(cancelled_starts(srv, random.Random(seed)))
        # Starts may go on after their calls ended (the job then simply runs). Fill the quota up with Starts
        # whose calls complete: once List shows exactly the quota's jobs running, no Start is in flight any more,
        # and a slot held by nothing List shows (a leak) would keep that from ever coming true.
        stub = srv.stub()
        deadline = time.monotonic() + bound(60)
        while True:
            try:
                stub.Start(SLEEP, timeout=60)
                continue
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
            running = [j for j in stub.List(pb.ListRequest(), timeout=60).jobs if j.status == pb.JOB_STATUS_RUNNING]
            assert len(running) <= STARTS, f"seed {seed}: {len(running)} jobs run, quota {STARTS}"
            if len(running) == STARTS:
                break
            assert time.monotonic() < deadline, f"seed {seed}: quota slots held by no job List shows"
            time.sleep(0.2)
        # every process in this server's job groups belongs to a job List shows
        seen = listed(srv)
        untracked = {pid: jid for pid, jid in job_processes(srv).items() if jid not in seen}
        assert not untracked, f"seed {seed}: processes of jobs List does not show: {untracked}"
        for job in running[:10]:  # tracked jobs are stoppable (the rest go with the shutdown)
            assert stub.Stop(pb.StopRequest(id=job.id, grace_seconds=0), timeout=60).status == pb.JOB_STATUS_STOPPED
        known = listed(srv)
    finally:
        assert srv.stop() == 0, srv.log()
        shutil.rmtree(srv.work_root, ignore_errors=True)
    left = job_processes(srv)
    assert not left, f"seed {seed}: job processes outlived the server: {left}"
    # a restart restores exactly the jobs List showed, none it did not
    again = start_server(tmp_path, keys)
    try:
        assert listed(again) == known, f"seed {seed}"
    finally:
        assert again.stop() == 0, again.log()
        shutil.rmtree(again.work_root, ignore_errors=True)
