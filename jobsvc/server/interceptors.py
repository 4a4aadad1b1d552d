"""Cross-cutting call handling: who is calling (identity), and errors and the request log (one place)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
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
from jobsvc.server.audit import AuditLog
from jobsvc.server.tls import TrustPolicy

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


def peer_identity(context: aio.ServicerContext) -> str | None:
    """The full Subject (RFC 4514) of the verified client certificate, or None.

    Parsed from the certificate grpc verified (x509_pem_cert): grpc's own x509_subject is in OpenSSL's print form,
    whose order and escaping differ from RFC 4514, and identity must not depend on a library's formatting. With
    require_client_auth there is always a verified certificate; without one there is no identity.
    """
    cert = peer_cert(context)
    return cert.subject if cert is not None else None


def peer_cert(context: aio.ServicerContext) -> ClientCert | None:
    """The verified client certificate of this call, if it is fit to identify a client."""
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
    deserializer = _tolerant(handler.request_deserializer) if tolerant else handler.request_deserializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary(cast(Unary, handler.unary_unary)), deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            streaming(cast(Streaming, handler.unary_stream)), deserializer, handler.response_serializer
        )
    return handler


class _JobServiceInterceptor(aio.ServerInterceptor):
    """Wraps JobService handlers (health and reflection pass through untouched)."""

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
        if handler is None or not method.startswith(JOB_SERVICE_PREFIX):
            return handler
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = _rewrap(handler, *self.wrappers(method), tolerant=self.tolerant)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def wrappers(self, method: str) -> tuple[Callable[[Unary], Unary], Callable[[Streaming], Streaming]]:
        raise NotImplementedError


class IdentityInterceptor(_JobServiceInterceptor):
    """Every JobService call runs as the caller's certificate Subject; no verified certificate, no call.

    With a TrustPolicy, a revoked certificate is UNAUTHENTICATED and a denied Subject PERMISSION_DENIED.
    """

    def __init__(self, trust: TrustPolicy | None = None) -> None:
        super().__init__()
        self._trust = trust

    def wrappers(self, method: str) -> tuple[Callable[[Unary], Unary], Callable[[Streaming], Streaming]]:
        trust = self._trust

        async def establish(context: aio.ServicerContext) -> None:
            cert = peer_cert(context)
            if cert is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a verified client certificate is required")
                return
            if trust is not None:
                if trust.is_revoked(cert.issuer, cert.serial):
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this client certificate is revoked")
                if trust.is_denied(cert.subject):
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "this identity is denied access")
            _identity.set(cert.subject)

        def unary(behavior: Unary) -> Unary:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                await establish(context)
                return await behavior(request, context)

            return call

        def streaming(behavior: Streaming) -> Streaming:
            async def call(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                await establish(context)
                async with _closing(behavior(request, context)) as items:
                    async for item in items:
                        yield item

            return call

        return unary, streaming


class ErrorInterceptor(_JobServiceInterceptor):
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

    tolerant = True

    def wrappers(self, method: str) -> tuple[Callable[[Unary], Unary], Callable[[Streaming], Streaming]]:

        def unary(behavior: Unary) -> Unary:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                started = time.monotonic()
                # Read now: after the call ends grpc may have freed it, and context.peer() then crashes the
                # process (a null dereference in cygrpc, seen when a client drops an open stream).
                peer = context.peer()
                outcome, job_id = "OK", getattr(request, "id", "") or None
                try:
                    if isinstance(request, MalformedRequest):
                        raise InvalidArgumentError("malformed request")
                    response = await behavior(request, context)
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
                    if isinstance(request, MalformedRequest):
                        raise InvalidArgumentError("malformed request")
                    async with _closing(behavior(request, context)) as items:
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
    name = method.rsplit("/", 1)[-1]
    entry: dict[str, Any] = {"identity": _identity.get(None), "method": name, "job_id": job_id}
    if name == "Start":
        entry["argv"] = [display_arg(a) for a in getattr(request, "argv", ())]
    entry.update(outcome=outcome, duration_ms=round((time.monotonic() - started) * 1000, 3), peer=peer, **extra)
    return entry
