"""JobService: translates between proto messages and the engine, nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from jobsvc._pb import jobs_pb2 as pb
from jobsvc._pb import jobs_pb2_grpc as pb_grpc
from jobsvc.manager import JobManager
from jobsvc.output import STDERR
from jobsvc.server.interceptors import current_identity
from jobsvc.wire import job_to_pb, limits_from_pb


class JobServicer(pb_grpc.JobServiceServicer):
    def __init__(self, manager: JobManager) -> None:
        self._m = manager

    async def Start(self, request: pb.StartRequest, context: aio.ServicerContext) -> pb.Job:
        record = await self._m.start(current_identity(), list(request.argv), limits_from_pb(request.limits))
        return job_to_pb(record)

    async def Get(self, request: pb.GetRequest, context: aio.ServicerContext) -> pb.Job:
        return job_to_pb(self._m.get(current_identity(), request.id))

    async def Stop(self, request: pb.StopRequest, context: aio.ServicerContext) -> pb.Job:
        grace = request.grace_seconds if request.HasField("grace_seconds") else None
        return job_to_pb(await self._m.stop(current_identity(), request.id, grace))

    async def Wait(self, request: pb.GetRequest, context: aio.ServicerContext) -> pb.Job:
        return job_to_pb(await self._m.wait(current_identity(), request.id))

    async def List(self, request: pb.ListRequest, context: aio.ServicerContext) -> pb.ListResponse:
        return pb.ListResponse(jobs=[job_to_pb(r) for r in self._m.list(current_identity())])

    async def Stream(self, request: pb.StreamRequest, context: aio.ServicerContext) -> AsyncIterator[pb.StreamResponse]:
        chunks = self._m.stream(current_identity(), request.id, request.from_offset)
        async for chunk in chunks:
            stream = pb.OUTPUT_STREAM_STDERR if chunk.fd == STDERR else pb.OUTPUT_STREAM_STDOUT
            yield pb.StreamResponse(data=chunk.data, stream=stream, offset=chunk.offset)
