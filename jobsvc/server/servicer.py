"""JobService: translates between proto messages and the engine, nothing more."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
from grpc import aio

from jobsvc._pb import jobs_pb2 as pb
from jobsvc._pb import jobs_pb2_grpc as pb_grpc
from jobsvc.errors import InvalidArgumentError
from jobsvc.manager import LIST_PAGE, LIST_PAGE_MAX, JobManager
from jobsvc.model import JobRecord
from jobsvc.output import STDERR, STDOUT
from jobsvc.server.interceptors import current_identity
from jobsvc.wire import encode_stream_response, job_to_pb, limits_from_pb, page_after, page_token, status_from_pb

LIST_REPLY_BYTES = 1 << 20  # a List page's jobs, encoded, at most about this (grpc refuses replies over 4 MiB)


class JobServicer(pb_grpc.JobServiceServicer):
    def __init__(self, manager: JobManager) -> None:
        self._m = manager

    async def Start(self, request: pb.StartRequest, context: aio.ServicerContext) -> pb.Job:
        record = await self._m.start(
            current_identity(),
            list(request.argv),
            limits_from_pb(request.limits),
            env=dict(request.env),
            workdir=request.workdir if request.HasField("workdir") else None,
            timeout=request.timeout_seconds if request.HasField("timeout_seconds") else None,
        )
        return job_to_pb(record)

    async def Get(self, request: pb.GetRequest, context: aio.ServicerContext) -> pb.Job:
        return job_to_pb(self._m.get(current_identity(), request.id))

    async def Stop(self, request: pb.StopRequest, context: aio.ServicerContext) -> pb.Job:
        grace = request.grace_seconds if request.HasField("grace_seconds") else None
        sig = request.signal if request.HasField("signal") else None
        return job_to_pb(await self._m.stop(current_identity(), request.id, grace, sig))

    async def Wait(self, request: pb.GetRequest, context: aio.ServicerContext) -> pb.Job:
        return job_to_pb(await self._m.wait(current_identity(), request.id))

    async def List(self, request: pb.ListRequest, context: aio.ServicerContext) -> pb.ListResponse:
        status = status_from_pb(request.status) if request.status else None
        since = request.since_seconds if request.HasField("since_seconds") else None
        after = page_after(request.page_token) if request.page_token else None
        size = min(request.page_size or LIST_PAGE, LIST_PAGE_MAX)
        records, more = self._m.list_page(
            current_identity(), status, since, after=after, limit=size, newest_first=request.newest_first
        )
        jobs: list[tuple[JobRecord, pb.Job]] = []
        total = 0
        for record in records:  # a page stays far below grpc's 4 MiB whatever the records hold (argv up to 128 KiB)
            msg = job_to_pb(record)
            total += msg.ByteSize() + 8
            if jobs and total > LIST_REPLY_BYTES:
                more = True
                break
            jobs.append((record, msg))
        token = page_token(jobs[-1][0].started_at, jobs[-1][0].id) if more and jobs else ""
        return pb.ListResponse(jobs=[m for _, m in jobs], next_page_token=token)

    async def Stream(self, request: pb.StreamRequest, context: aio.ServicerContext) -> AsyncIterator[bytes]:
        """Yields StreamResponse messages already encoded (add_to_server registers Stream without a serializer)."""
        only = {pb.OUTPUT_STREAM_STDOUT: STDOUT, pb.OUTPUT_STREAM_STDERR: STDERR}.get(request.only)
        if request.only and only is None:
            raise InvalidArgumentError(f"unknown output stream {request.only}")
        chunks = self._m.stream(
            current_identity(),
            request.id,
            request.from_offset,
            follow=not request.no_follow,
            only=only,
            tail_lines=request.tail_lines if request.HasField("tail_lines") else None,
            since_ms=request.since.ToMilliseconds() if request.HasField("since") else None,
        )
        async with contextlib.aclosing(cast(Any, chunks)) as items:  # a cancelled call gives its slot back now
            async for chunk in items:
                stream = pb.OUTPUT_STREAM_STDERR if chunk.fd == STDERR else pb.OUTPUT_STREAM_STDOUT
                yield encode_stream_response(chunk.data, stream, chunk.offset, chunk.read_at_ms)


PRE_ENCODED = frozenset({"Stream"})  # methods whose responses the servicer encodes itself


def add_to_server(servicer: JobServicer, server: aio.Server) -> None:
    """Register JobService as the generated add_JobServiceServicer_to_server does, from the same descriptor, except
    that the PRE_ENCODED methods' responses go out as the servicer made them."""
    service = pb.DESCRIPTOR.services_by_name["JobService"]
    handlers = {}
    for method in service.methods:
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        response = None if method.name in PRE_ENCODED else getattr(pb, method.output_type.name).SerializeToString
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=getattr(pb, method.input_type.name).FromString,
            response_serializer=response,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]  # not in the ABC
