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
