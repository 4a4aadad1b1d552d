"""The hand-made wire form of StreamResponse must be exactly what protobuf makes (and parses back)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from jobsvc._pb import jobs_pb2 as pb
from jobsvc.wire import encode_stream_response

SIZES = [0, 1, 127, 128, 16383, 16384, 2097151, 2097152]  # around every varint length boundary


@given(
    data=st.binary(max_size=300) | st.sampled_from(SIZES).map(lambda n: b"\x00" * n),
    stream=st.sampled_from([0, pb.OUTPUT_STREAM_STDOUT, pb.OUTPUT_STREAM_STDERR]),
    offset=st.integers(min_value=0, max_value=2**64 - 1) | st.sampled_from([0, 127, 128, 2**63, 2**64 - 1]),
    read_at_ms=st.integers(min_value=0, max_value=2**56 - 1) | st.sampled_from([0, 1_796_120_683_089]),
)
def test_encoded_stream_response_is_protobufs_own_encoding(
    data: bytes, stream: int, offset: int, read_at_ms: int
) -> None:
    mine = encode_stream_response(data, stream, offset, read_at_ms)
    made = pb.StreamResponse(data=data, stream=stream, offset=offset, read_at_ms=read_at_ms)  # type: ignore[arg-type]
    assert mine == made.SerializeToString()
    back = pb.StreamResponse.FromString(mine)
    assert (back.data, back.stream, back.offset, back.read_at_ms) == (data, stream, offset, read_at_ms)


def test_a_large_chunk_keeps_its_bytes() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    back = pb.StreamResponse.FromString(encode_stream_response(data, pb.OUTPUT_STREAM_STDERR, 5 << 30))
    assert back.data == data and back.stream == pb.OUTPUT_STREAM_STDERR and back.offset == 5 << 30


def test_the_encoder_knows_every_field_of_stream_response() -> None:
    # a field added to the proto must be added to encode_stream_response too (this test names the place)
    fields = {f.name: (f.number, f.type) for f in pb.StreamResponse.DESCRIPTOR.fields}
    fd = pb.StreamResponse.DESCRIPTOR.fields_by_name["data"]
    assert fields == {
        "data": (1, fd.TYPE_BYTES),
        "stream": (2, fd.TYPE_ENUM),
        "offset": (3, fd.TYPE_UINT64),
        "read_at_ms": (4, fd.TYPE_UINT64),
    }, "update jobsvc/wire.py encode_stream_response for the changed StreamResponse"


def test_a_job_record_survives_the_wire_with_every_field_set() -> None:
    import dataclasses
    import datetime as dt

    from jobsvc.model import IoLimit, JobRecord, Limits, Usage
    from jobsvc.states import JobStatus
    from jobsvc.wire import job_from_pb, job_to_pb

    t0 = dt.datetime(2026, 12, 1, 9, 0, 0, 123000, tzinfo=dt.UTC)
    record = JobRecord(
        id="0b7d1b1e-5f0e-4b8e-9a59-6f2f3c1d2e4f",
        owner="CN=alice,O=Example",
        command=(b"sh", b"-c", b"echo \xff"),
        status=JobStatus.STOPPED,
        started_at=t0,
        limits=Limits(cpu=0.5, memory_bytes=64 << 20, pids=20, io=(IoLimit("254:0", 1, 2, 3, 4),)),
        pid=42,
        reason="stopped by owner",
        exit_code=None,
        signal=15,
        oom_killed=True,
        pids_limit_hit=True,
        ended_at=t0 + dt.timedelta(seconds=2),
        usage=Usage(1.5, 4, 1000, 5, 6),
        output_bytes=12,
        uid=61184,
        output_dropped_bytes=7,
        output_lost_bytes=8,
        timeout_seconds=30.0,
        workdir="/var/tmp/x",
    )
    defaults = JobRecord(id="", owner="", command=(), status=JobStatus.RUNNING, started_at=t0 - dt.timedelta(1))
    unset = [f.name for f in dataclasses.fields(record) if getattr(record, f.name) == getattr(defaults, f.name)]
    assert unset == ["exit_code"], "set every field, so that a field the wire drops fails this test"
    again = job_from_pb(pb.Job.FromString(job_to_pb(record).SerializeToString()))
    assert again == record
