"""Cross-cutting call handling: who is calling (identity), and errors and the request log (one place)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
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
from jobsvc.model import display_arg
from jobsvc.quota import Quota
from jobsvc.server.audit import AuditLog
from jobsvc.server.reserve import ConnectionReserve
from jobsvc.server.tls import TrustPolicy

log = logging.getLogger("jobsvc.server")
request_log = logging.getLogger("jobsvc.request")

JOB_SERVICE_PREFIX = "/jobsvc.v1.JobService/"
# Unary calls that a client can hold open indefinitely (streaming calls always can): they count toward the per-user
# quota of held calls. Start, Get, Stop and List end by themselves and are bounded per connection instead.
HELD_UNARY = frozenset({JOB_SERVICE_PREFIX + "Wait"})
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


@dataclass(frozen=True)
class ClientCert:
    subject: str
    issuer: str
    serial: int


@functools.lru_cache(maxsize=1024)
def _client_cert(pem: bytes) -> ClientCert | None:
    """The Subject of a certificate fit to identify a client, else None.

    TLS already verified the chain, the dates and (BoringSSL) an extended key usage without clientAuth. A CA
    certificate carries no EKU and passes that check, but is never a user.
    """
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    cert = x509.load_pem_x509_certificate(pem)
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return None
    except x509.ExtensionNotFound:
        pass
    try:
        if ExtendedKeyUsageOID.CLIENT_AUTH not in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value:
            return None
    except x509.ExtensionNotFound:
        pass
    return ClientCert(cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(), cert.serial_number)


def peer_cert(context: aio.ServicerContext) -> ClientCert | None:
    """The verified client certificate of this call, if it is fit to identify a client.

    Parsed from the certificate grpc verified (x509_pem_cert): grpc's own x509_subject is in OpenSSL's print form,
    whose order and escaping differ from RFC 4514, and identity must not depend on a library's formatting.
    """
    pems = list(context.auth_context().get("x509_pem_cert") or ())
    return _client_cert(pems[0]) if pems else None


class MalformedRequest:
    """What a request that does not parse becomes, so that it is answered INVALID_ARGUMENT, not INTERNAL."""


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # any parse failure is the client's malformed request
            return MalformedRequest()

    return parse


def _rewrap(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[Unary], Unary],
    streaming: Callable[[Streaming], Streaming],
    tolerant: bool = False,
) -> grpc.RpcMethodHandler:
    """The same method with its behaviour wrapped: `unary` for a single response, `streaming` for many (the
    request, one message or an async iterator of them, is passed through)."""
    deserializer = _tolerant(handler.request_deserializer) if tolerant else handler.request_deserializer
    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(cast(Unary, handler.unary_unary)), deserializer, serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary(cast(Unary, handler.stream_unary)), deserializer, serializer)
    if handler.unary_stream is not None:
        behavior = streaming(cast(Streaming, handler.unary_stream))
        return grpc.unary_stream_rpc_method_handler(behavior, deserializer, serializer)
    if handler.stream_stream is not None:
        behavior = streaming(cast(Streaming, handler.stream_stream))
        return grpc.stream_stream_rpc_method_handler(behavior, deserializer, serializer)
    return handler


class _CallInterceptor(aio.ServerInterceptor):
    """Wraps the handlers of every service on the port (JobService, health, reflection alike): a service left out
    answered revoked, denied and CA certificates, and met malformed requests with a traceback."""

    tolerant = False  # whether requests that do not parse reach the wrapper as MalformedRequest

    def __init__(self) -> None:
        # method -> (the handler we were given, our wrapped one): the wrappers hold nothing per call, so each
        # method is wrapped once, not on every call (that rebuilt closures and handlers on the hot path)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None:
            return handler  # no such method: grpc answers UNIMPLEMENTED, and no handler runs
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = _rewrap(handler, *self.wrappers(method, handler), tolerant=self.tolerant)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def wrappers(
        self, method: str, handler: grpc.RpcMethodHandler
    ) -> tuple[Callable[[Unary], Unary], Callable[[Streaming], Streaming]]:
        raise NotImplementedError


def _held(method: str, handler: grpc.RpcMethodHandler) -> bool:
    """Calls a client can keep open as long as it likes: Wait, and every streaming call of any service."""
    return method in HELD_UNARY or handler.request_streaming or handler.response_streaming


class IdentityInterceptor(_CallInterceptor):
    """Every call, to any service, runs as the caller's certificate Subject; no verified certificate, no call.

    With a TrustPolicy, a revoked certificate is UNAUTHENTICATED and a denied Subject PERMISSION_DENIED. With a
    quota of held calls, a user's concurrent Waits and streaming calls beyond it are RESOURCE_EXHAUSTED.
    """

    def __init__(
        self,
        trust: TrustPolicy | None = None,
        held_calls: Quota | None = None,
        reserve: ConnectionReserve | None = None,
    ) -> None:
        super().__init__()
        self._trust = trust
        self._held_calls = held_calls
        self._reserve = reserve

    def wrappers(
        self, method: str, handler: grpc.RpcMethodHandler
    ) -> tuple[Callable[[Unary], Unary], Callable[[Streaming], Streaming]]:
        trust = self._trust
        quota = self._held_calls if _held(method, handler) else None
        reserve = self._reserve

        async def establish(request: Any, context: aio.ServicerContext) -> str:
            cert = peer_cert(context)
            if cert is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a verified client certificate is required")
                raise AssertionError("abort returned")  # abort raises; this keeps the type checker sure of it
            if trust is not None:
                if trust.is_revoked(cert.issuer, cert.serial):
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this client certificate is revoked")
                if trust.is_denied(cert.subject):
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "this identity is denied access")
            if reserve is not None:
                reserve.admit(context.peer())
            _identity.set(cert.subject)
            if isinstance(request, MalformedRequest):
                raise InvalidArgumentError("malformed request")
            if quota is not None:
                quota.take(cert.subject)  # checked and taken in one step; given back in the caller's finally
            return cert.subject

        def unary(behavior: Unary) -> Unary:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                who = await establish(request, context)
                try:
                    return await behavior(request, context)
                finally:
                    if quota is not None:
                        quota.give_back(who)

            return call

        def streaming(behavior: Streaming) -> Streaming:
            async def call(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                who = await establish(request, context)
                try:
                    async with _closing(_responses(behavior, request, context)) as items:
                        async for item in items:
                            yield item
                finally:
                    if quota is not None:
                        quota.give_back(who)

            return call

        return unary, streaming


async def _responses(behavior: Streaming, request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
    """A streaming handler's responses as one async iterator, whether it yields them (JobService, reflection) or
    writes them itself with context.write and returns (health's Watch)."""
    result: Any = behavior(request, context)
    if inspect.isawaitable(result):
        await result
        return
    async with _closing(result) as items:
        async for item in items:
            yield item


async def _parsed(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A request stream in which a message that does not parse ends the call with INVALID_ARGUMENT."""
    async for request in requests:
        if isinstance(request, MalformedRequest):
            raise InvalidArgumentError("malformed request")
        yield request


class ErrorInterceptor(_CallInterceptor):
    """JobError -> its status with its message; anything else -> INTERNAL, generic, traceback in the log.

    Also writes the one structured line per request (identity, method, job id, argv for Start, outcome, duration,
    peer) to the server log and to the audit log.
    """

    def __init__(self, audit: AuditLog | None = None) -> None:
        super().__init__()
        self._audit = audit

    def _record(
        self,
        peer: str,
        method: str,
        request: Any,
        job_id: str | None,
        outcome: str,
        started: float,
        **extra: Any,
    ) -> None:
        line = json.dumps(_request_entry(peer, method, request, job_id, outcome, started, **extra))
        request_log.info(line)
        if self._audit is not None:
            self._audit.write(line)  # serialized once for both logs

    def _check_audit(self) -> None:
        if self._audit is not None and not self._audit.accepting:
            raise UnavailableError("the server cannot write its audit log (its disk is full); try again later")

    tolerant = True

    def wrappers(
        self, method: str, handler: grpc.RpcMethodHandler
    ) -> tuple[Callable[[Unary], Unary], Callable[[Streaming], Streaming]]:
        request_streaming = handler.request_streaming

        def checked(request: Any) -> Any:
            # A single request that does not parse reaches the identity check as MalformedRequest (the caller is
            # refused first if it must be); a stream's messages are checked as the handler reads them.
            return _parsed(request) if request_streaming else request

        def unary(behavior: Unary) -> Unary:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                started = time.monotonic()
                # Read now: after the call ends grpc may have freed it, and context.peer() then crashes the
                # process (a null dereference in cygrpc, seen when a client drops an open stream).
                peer = context.peer()
                outcome, job_id = "OK", getattr(request, "id", "") or None
                try:
                    self._check_audit()
                    response = await behavior(checked(request), context)
                    job_id = job_id or getattr(response, "id", None)
                    return response
                except BaseException as e:
                    outcome, code, message = _map(e, context, method)
                    if code is not None:
                        await context.abort(code, message)
                    raise
                finally:
                    self._record(peer, method, request, job_id, outcome, started)

            return call

        def streaming(behavior: Streaming) -> Streaming:
            async def call(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                started = time.monotonic()
                # Read now: after the call ends grpc may have freed it, and context.peer() then crashes the
                # process (a null dereference in cygrpc, seen when a client drops an open stream).
                peer = context.peer()
                outcome, sent = "OK", 0
                try:
                    self._check_audit()
                    async with _closing(_responses(behavior, checked(request), context)) as items:
                        async for item in items:
                            sent += len(item) if isinstance(item, bytes) else item.ByteSize()
                            yield item
                except BaseException as e:
                    outcome, code, message = _map(e, context, method)
                    if code is not None:
                        await context.abort(code, message)
                    raise
                finally:
                    self._record(peer, method, request, getattr(request, "id", None), outcome, started, bytes=sent)

            return call

        return unary, streaming


def _closing(items: AsyncIterator[Any]) -> contextlib.AbstractAsyncContextManager[Any]:
    """Close the inner generator when this one ends, however it ends: left to the garbage collector, a cancelled
    stream's inner generators (and the quota slot they hold) were let go of only some time after the call ended."""
    return contextlib.aclosing(cast(Any, items))


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


def _request_entry(
    peer: str,
    method: str,
    request: Any,
    job_id: str | None,
    outcome: str,
    started: float,
    **extra: Any,
) -> dict[str, Any]:
    # JobService's methods by their own names (as ever); other services' by service and method
    name = method.removeprefix(JOB_SERVICE_PREFIX).lstrip("/")
    entry: dict[str, Any] = {"identity": _identity.get(None), "method": name, "job_id": job_id}
    if name == "Start":
        entry["argv"] = [display_arg(a) for a in getattr(request, "argv", ())]
    entry.update(outcome=outcome, duration_ms=round((time.monotonic() - started) * 1000, 3), peer=peer, **extra)
    return entry
