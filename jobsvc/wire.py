"""Proto <-> model translation, shared by the server's servicer and jobctl's client (no grpc import here).

The conversions are derived (jobsvc.codec) from the dataclasses and each message's descriptor: a field is copied
under its own name; an optional model field is an optional proto field (HasField), or, where the proto field has
no presence (Job.workdir), its empty value means None; enums map by member name (RUNNING <-> JOB_STATUS_RUNNING).
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections.abc import Callable
from typing import Any, TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from jobsvc import codec
from jobsvc._pb import jobs_pb2 as pb
from jobsvc.errors import InvalidArgumentError
from jobsvc.model import IoLimit, JobRecord, Limits, Usage
from jobsvc.states import JobStatus

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)

# the message of each dataclass (the one name that differs: a JobRecord is a Job on the wire)
MESSAGES: dict[type, type[Message]] = {JobRecord: pb.Job, Limits: pb.Limits, Usage: pb.Usage, IoLimit: pb.IoLimit}


def enum_values(py_enum: type[E], pb_enum: Any) -> dict[E, int]:
    """member -> number: JobStatus.RUNNING is JOB_STATUS_RUNNING (the proto enum's name in UPPER_SNAKE_CASE)."""
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", pb_enum.name).upper()
    return {m: pb_enum.values_by_name[f"{prefix}_{m.name}"].number for m in py_enum}


_STATUS_TO_PB = enum_values(JobStatus, pb.Job.DESCRIPTOR.fields_by_name["status"].enum_type)
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}


def status_from_pb(value: int) -> JobStatus:
    """A JobStatus enum value from the wire; InvalidArgumentError for unknown values."""
    try:
        return _STATUS_FROM_PB[value]
    except KeyError:
        raise InvalidArgumentError(f"unknown job status {value}") from None


def status_to_pb(status: JobStatus) -> int:
    return _STATUS_TO_PB[status]


def _ts(t: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(t)
    return ts


def _from_ts(ts: Timestamp) -> dt.datetime:
    return ts.ToDatetime(dt.UTC)


def _fields(cls: type) -> dict[str, Any]:
    """The message's field descriptors by name."""
    return dict(MESSAGES[cls].DESCRIPTOR.fields_by_name)


def encoder(cls: type[T]) -> Callable[[T], Any]:
    """obj -> its message. Optional fields are set only when not None (unset is how the wire says None)."""
    fn: Callable[[T], Any] = codec.made_once("pb", cls, lambda: _encoder(cls))
    return fn


def decoder(cls: type[T]) -> Callable[[Any], T]:
    """message -> obj: an unset optional field is None."""
    fn: Callable[[Any], T] = codec.made_once("from pb", cls, lambda: _decoder(cls))
    return fn


def _encoder(cls: type) -> Any:
    src = codec.Source()
    always, optional = [], []
    fields = _fields(cls)
    for s in codec.shapes(cls):
        value = f"o.{s.name}"
        if s.kind == "enum":
            value = f"{src.ref(enum_values(s.type, fields[s.name].enum_type), 'enum')}[{{}}]"
        elif s.kind == "time":
            value = f"{src.ref(_ts, 'ts')}({{}})"
        elif s.kind == "record":
            value = f"{src.ref(encoder(s.type), 'enc')}({{}})"
        elif s.kind == "records":
            value = f"[{src.ref(encoder(s.type), 'enc')}(x) for x in {{}}]"
        else:
            value = "{}"
        if not s.optional:
            always.append(f"{s.name}={value.format(f'o.{s.name}')},")
        elif fields[s.name].has_presence:
            optional += [f"if (v := o.{s.name}) is not None:", f"    kw[{s.name!r}] = {value.format('v')}"]
        else:  # no presence on the wire: None travels as the empty value
            empty = src.ref(fields[s.name].default_value, "empty")
            always.append(f"{s.name}={empty} if (v := o.{s.name}) is None else {value.format('v')},")
    message = src.ref(MESSAGES[cls], "message")
    lines = ["kw = dict(", *always, ")", *optional, f"return {message}(**kw)"]
    return src.compile(f"{cls.__name__}_to_pb", lines)


def _decoder(cls: type) -> Any:
    src = codec.Source()
    args = []
    fields = _fields(cls)
    for s in codec.shapes(cls):
        raw = f"o.{s.name}"
        if s.kind == "enum":
            to_pb: dict[Any, int] = enum_values(s.type, fields[s.name].enum_type)
            from_pb = {number: member for member, number in to_pb.items()}
            value = f"{src.ref(from_pb, 'enum')}[{raw}]"
        elif s.kind == "time":
            value = f"{src.ref(_from_ts, 'ts')}({raw})"
        elif s.kind == "record":
            value = f"{src.ref(decoder(s.type), 'dec')}({raw})"
        elif s.kind == "records":
            value = f"tuple([{src.ref(decoder(s.type), 'dec')}(x) for x in {raw}])"
        elif s.kind == "argv":
            value = f"tuple({raw})"
        else:
            value = raw
        if s.optional and fields[s.name].has_presence:
            value = f"({value} if o.HasField({s.name!r}) else None)"
        elif s.optional:  # no presence on the wire: the empty value is None
            value = f"({raw} or None)"
        args.append(f"{s.name}={value},")
    return src.compile(f"{cls.__name__}_from_pb", [f"return {src.ref(cls, 'cls')}(", *args, ")"])


limits_to_pb: Callable[[Limits], pb.Limits] = encoder(Limits)
limits_from_pb: Callable[[pb.Limits], Limits] = decoder(Limits)
job_to_pb: Callable[[JobRecord], pb.Job] = encoder(JobRecord)
job_from_pb: Callable[[pb.Job], JobRecord] = decoder(JobRecord)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_stream_response(data: bytes, stream: int, offset: int, read_at_ms: int = 0) -> bytes:
    """A StreamResponse in its wire form, byte for byte what StreamResponse(...).SerializeToString() gives.

    Stream is the bulk path: building a message object copies the chunk into a fresh upb arena and serializing
    copies it again, and those large short-lived allocations made glibc trim and re-fault the heap on every
    message (0.5 ms per 256 KiB on this host). Here a chunk is copied once, next to a header of a few bytes.
    """
    parts: list[bytes] = []
    if data:
        parts += (b"\x0a", _varint(len(data)), data)  # field 1, length-delimited
    if stream:
        parts += (b"\x10", _varint(stream))  # field 2, varint (an enum)
    if offset:
        parts += (b"\x18", _varint(offset))  # field 3, varint
    if read_at_ms:
        parts += (b"\x20", _varint(read_at_ms))  # field 4, varint
    return b"".join(parts)


def page_token(started_at: dt.datetime, job_id: str) -> str:
    """Where a List page ended: the (start time, id) of its last job, which sorts every job."""
    return f"v1:{int(started_at.timestamp() * 1_000_000)}:{job_id}"


def page_after(token: str) -> tuple[dt.datetime, str]:
    """The position a page token names; InvalidArgumentError for anything else."""
    from jobsvc.errors import InvalidArgumentError

    version, _, rest = token.partition(":")
    micros, _, job_id = rest.partition(":")
    if version != "v1" or not micros.isdigit() or not job_id:
        raise InvalidArgumentError("page_token is not one this server gave out")
    return dt.datetime.fromtimestamp(int(micros) / 1_000_000, dt.UTC), job_id
