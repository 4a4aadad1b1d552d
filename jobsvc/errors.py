"""Errors a client can cause; the server maps each subclass to one gRPC status, in one place."""

from __future__ import annotations


class JobError(Exception):
    """Base of all errors whose message is safe to show to the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgumentError(JobError):
    """The request is malformed or asks for something impossible; nothing was changed."""


class NotFoundError(JobError):
    """No such job for this caller (another owner's job is reported exactly like a missing one)."""


class FailedPreconditionError(JobError):
    """The request is valid but the job or server is not in a state that allows it."""


class ResourceExhaustedError(JobError):
    """A quota or a host resource is used up."""


def not_found() -> NotFoundError:
    """The one NotFound error: it names nothing, so another owner's job and a missing one read the same."""
    return NotFoundError("no such job")


class UnavailableError(JobError):
    """The server cannot take this call now (it is shutting down)."""
