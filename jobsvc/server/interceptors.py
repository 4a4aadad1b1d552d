"""Cross-cutting call handling: who is calling (identity), and errors and the request log (one place)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc
from grpc import aio

from jobsvc.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    JobError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)

log = logging.getLogger("jobsvc.server")
request_log = logging.getLogger("jobsvc.request")

JOB_SERVICE_PREFIX = "/jobsvc.v1.JobService/"
_identity: contextvars.ContextVar[str] = contextvars.ContextVar("identity")

_CODES: list[tuple[type[JobError], grpc.StatusCode]] = [
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
]

Unary = Callable[[Any, aio.ServicerContext], Awaitable[Any]]
Streaming = Callable[[Any, aio.ServicerContext], AsyncIterator[Any]]


def current_identity() -> str:
    """The verified caller of the current RPC (set by IdentityInterceptor)."""
    return _identity.get()


def status_for(error: JobError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


@functools.lru_cache(maxsize=1024)
def _subject_from_pem(pem: bytes) -> str:
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem).subject.rfc4514_string()


def peer_identity(context: aio.ServicerContext) -> str | None:
    """The full Subject (RFC 4514) of the verified client certificate, or None.

    Parsed from the certificate grpc verified (x509_pem_cert): grpc's own x509_subject is in OpenSSL's print form,
    whose order and escaping differ from RFC 4514, and identity must not depend on a library's formatting.
    """
    auth = context.auth_context()
    pems = list(auth.get("x509_pem_cert") or ())
    if pems:
        return _subject_from_pem(pems[0])
    subjects = list(auth.get("x509_subject") or ())
    if subjects:
        return str(subjects[0].decode())
    return None


def _rewrap(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[Unary], Unary],
    streaming: Callable[[Streaming], Streaming],
) -> grpc.RpcMethodHandler:
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary(cast(Unary, handler.unary_unary)), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            streaming(cast(Streaming, handler.unary_stream)), handler.request_deserializer, handler.response_serializer
        )
    return handler


class IdentityInterceptor(aio.ServerInterceptor):
    """Every JobService call runs as the caller's certificate Subject; no verified certificate, no call."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(JOB_SERVICE_PREFIX):
            return handler

        async def establish(context: aio.ServicerContext) -> None:
            who = peer_identity(context)
            if not who:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a verified client certificate is required")
            _identity.set(who or "")

        def unary(behavior: Unary) -> Unary:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                await establish(context)
                return await behavior(request, context)

            return call

        def streaming(behavior: Streaming) -> Streaming:
            async def call(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                await establish(context)
                async for item in behavior(request, context):
                    yield item

            return call

        return _rewrap(handler, unary, streaming)


class ErrorInterceptor(aio.ServerInterceptor):
    """JobError -> its status with its message; anything else -> INTERNAL, generic, traceback in the log.

    Also writes the one structured log line per request: identity, method, job id, outcome, duration.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(JOB_SERVICE_PREFIX):
            return handler
        method = details.method

        def unary(behavior: Unary) -> Unary:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                started = time.monotonic()
                outcome, job_id = "OK", getattr(request, "id", "") or None
                try:
                    response = await behavior(request, context)
                    job_id = job_id or getattr(response, "id", None)
                    return response
                except BaseException as e:
                    outcome, code, message = _map(e, context, method)
                    if code is not None:
                        await context.abort(code, message)
                    raise
                finally:
                    _log_request(context, method, job_id, outcome, started)

            return call

        def streaming(behavior: Streaming) -> Streaming:
            async def call(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                started = time.monotonic()
                outcome, sent = "OK", 0
                try:
                    async for item in behavior(request, context):
                        sent += len(getattr(item, "data", b""))
                        yield item
                except BaseException as e:
                    outcome, code, message = _map(e, context, method)
                    if code is not None:
                        await context.abort(code, message)
                    raise
                finally:
                    _log_request(context, method, getattr(request, "id", None), outcome, started, bytes=sent)

            return call

        return _rewrap(handler, unary, streaming)


def _map(e: BaseException, context: aio.ServicerContext, method: str) -> tuple[str, grpc.StatusCode | None, str]:
    """(outcome for the log, status to abort with or None to let e pass, client-visible message)."""
    if isinstance(e, aio.AbortError):
        code = context.code()
        return (code.name if isinstance(code, grpc.StatusCode) else "ABORTED"), None, ""
    if isinstance(e, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED", None, ""
    if isinstance(e, JobError):
        code = status_for(e)
        return code.name, code, e.message
    if not isinstance(e, Exception):
        return type(e).__name__, None, ""
    log.error("unexpected error in %s", method, exc_info=e)
    return "INTERNAL", grpc.StatusCode.INTERNAL, "internal error"


def _log_request(
    context: aio.ServicerContext, method: str, job_id: str | None, outcome: str, started: float, **extra: Any
) -> None:
    if not request_log.isEnabledFor(logging.INFO):
        return
    try:
        who = _identity.get(None) or peer_identity(context)
    except Exception:
        who = None
    entry = {
        "identity": who,
        "method": method.rsplit("/", 1)[-1],
        "job_id": job_id,
        "outcome": outcome,
        "duration_ms": round((time.monotonic() - started) * 1000, 3),
        "peer": context.peer(),
        **extra,
    }
    request_log.info(json.dumps(entry))
