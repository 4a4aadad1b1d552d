"""One definition per fact: the dataclasses, the proto and the JSON/store/wire forms derived from them agree."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import given, settings
from hypothesis import strategies as st

from jobsvc import codec
from jobsvc._pb import jobs_pb2 as pb
from jobsvc.model import IoLimit, JobRecord, Limits, Usage
from jobsvc.states import JobStatus
from jobsvc.store import JobStore, record_from_json, record_to_json
from jobsvc.wire import MESSAGES, job_from_pb, job_to_pb, limits_from_pb, limits_to_pb

DATA = Path(__file__).parent / "data"
F = FieldDescriptor

# Where the model and the proto deliberately differ, and why (everything else must match field for field).
DELIBERATE = {
    (JobRecord, "workdir"): "optional in the model; a plain string on the wire, where empty means None",
}

_INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
}
_SCALAR_TYPES: dict[type, set[int]] = {
    int: set(_INT_RANGES),
    float: {F.TYPE_DOUBLE},
    str: {F.TYPE_STRING},
    bool: {F.TYPE_BOOL},
}


def differences(cls: type, message: type[Any]) -> list[str]:
    """How dataclass cls and its proto message disagree: fields only one has, or of different kinds."""
    shapes = {s.name: s for s in codec.shapes(cls)}
    fields: dict[str, Any] = dict(message.DESCRIPTOR.fields_by_name)
    out = [f"{cls.__name__}.{n} is not in {message.__name__}" for n in shapes if n not in fields]
    out += [f"{message.__name__}.{n} is not in {cls.__name__}" for n in fields if n not in shapes]
    for name in shapes.keys() & fields.keys():
        s, f = shapes[name], fields[name]
        repeated = s.kind in ("records", "argv")
        if f.is_repeated != repeated:
            out.append(f"{cls.__name__}.{name}: repeated is {repeated} in the model, {f.is_repeated} in the proto")
        if s.kind == "scalar":
            same = f.type in _SCALAR_TYPES[s.type]
        elif s.kind == "argv":
            same = f.type == F.TYPE_BYTES
        elif s.kind == "enum":
            same = f.type == F.TYPE_ENUM and {m.name for m in cast("type[enum.Enum]", s.type)} == {
                v.name.removeprefix(enum_prefix(f.enum_type.name)) for v in f.enum_type.values
            } - {"UNSPECIFIED"}
        elif s.kind == "time":
            same = f.type == F.TYPE_MESSAGE and f.message_type.full_name == "google.protobuf.Timestamp"
        else:  # a nested dataclass, or a tuple of them
            same = f.type == F.TYPE_MESSAGE and f.message_type is MESSAGES[s.type].DESCRIPTOR
        if not same:
            out.append(f"{cls.__name__}.{name}: {s.kind} {s.type.__name__} in the model, proto type {f.type}")
        scalar = f.type != F.TYPE_MESSAGE and not repeated  # message fields always have presence
        if scalar and s.optional != f.has_presence and (cls, name) not in DELIBERATE:
            out.append(f"{cls.__name__}.{name}: optional is {s.optional} in the model, {f.has_presence} in the proto")
    return out


def enum_prefix(pb_enum_name: str) -> str:
    """JobStatus -> 'JOB_STATUS_' (how the proto's enum values are named)."""
    return "".join("_" + c if c.isupper() and i else c for i, c in enumerate(pb_enum_name)).upper() + "_"


@pytest.mark.parametrize("cls", list(MESSAGES), ids=lambda c: c.__name__)
def test_each_dataclass_matches_its_proto_message(cls: type) -> None:
    assert differences(cls, MESSAGES[cls]) == []


def test_a_field_only_one_side_has_is_a_difference() -> None:
    grown = dataclasses.make_dataclass("Limits", [("swap_bytes", int | None, None)], bases=(Limits,), frozen=True)
    assert differences(grown, pb.Limits) == ["Limits.swap_bytes is not in Limits"]
    assert differences(Usage, pb.Limits) != []  # every field differs
    shrunk = dataclasses.make_dataclass("IoLimit", [("device", str)], frozen=True)
    assert sorted(differences(shrunk, pb.IoLimit)) == [f"IoLimit.{n} is not in IoLimit" for n in sorted(_IO_RATES)]


_IO_RATES = ("read_bps", "read_iops", "write_bps", "write_iops")


def test_a_kind_that_differs_is_a_difference() -> None:
    retyped = dataclasses.make_dataclass(
        "Usage", [("cpu_seconds", str | None, None)], bases=(Usage,), frozen=True
    )  # the field redefined with another type
    assert differences(retyped, pb.Usage) == ["Usage.cpu_seconds: scalar str in the model, proto type 1"]
    required = dataclasses.make_dataclass("Usage", [("cpu_seconds", float, 0.0)], bases=(Usage,), frozen=True)
    assert differences(required, pb.Usage) == ["Usage.cpu_seconds: optional is False in the model, True in the proto"]


# -- strategies derived from the fields: a new field is covered without an edit here -----------------------------

_TEXT = st.text(st.characters(codec="utf-8"), max_size=20)  # protobuf strings are UTF-8: no lone surrogates
_TIMES = st.datetimes(min_value=dt.datetime(1970, 1, 1), max_value=dt.datetime(9999, 1, 1), timezones=st.just(dt.UTC))


def _values(s: codec.Shape, field: Any) -> st.SearchStrategy[Any]:
    """Any value the field may hold (not None) that both the store and the wire can carry."""
    if s.kind == "scalar" and s.type is int:
        lo, hi = _INT_RANGES[field.type]
        return st.integers(lo, hi)
    if s.kind == "scalar":
        by_type: dict[type, st.SearchStrategy[Any]] = {
            float: st.floats(allow_nan=False),  # NaN is not equal to itself
            str: _TEXT,
            bool: st.booleans(),
        }
        strategy = by_type[s.type]
        if s.optional and not field.has_presence:  # the wire's empty value is None (DELIBERATE)
            strategy = strategy.filter(bool)
        return strategy
    if s.kind == "enum":
        return st.sampled_from(list(cast("type[enum.Enum]", s.type)))
    if s.kind == "time":
        return _TIMES
    if s.kind == "argv":
        return st.lists(st.binary(max_size=12), max_size=4).map(tuple)
    if s.kind == "record":
        return objects(s.type)
    return st.lists(objects(s.type), max_size=3).map(tuple)


def objects(cls: type, every_field_set: bool = False) -> st.SearchStrategy[Any]:
    """Instances of dataclass cls; every_field_set: no field None or at its default."""
    fields: dict[str, Any] = dict(MESSAGES[cls].DESCRIPTOR.fields_by_name)
    kwargs = {}
    for s in codec.shapes(cls):
        values = _values(s, fields[s.name])
        if every_field_set:
            if s.kind in ("record", "records", "argv"):
                values = objects(s.type, True) if s.kind == "record" else st.lists(_inner(s), min_size=1, max_size=3)
                values = values.map(tuple) if s.kind != "record" else values
            if not s.required:
                values = values.filter(_differs_from(s.default))
        elif s.optional:
            values = st.none() | values
        kwargs[s.name] = values
    return st.builds(cls, **kwargs)


def _differs_from(default: object) -> Callable[[object], bool]:
    return lambda value: value != default


def _inner(s: codec.Shape) -> st.SearchStrategy[Any]:
    if s.kind == "argv":
        return st.binary(min_size=1, max_size=12)
    return objects(s.type, True)


@settings(deadline=None)  # a loaded machine is slow, not wrong
@given(objects(JobRecord))
def test_a_record_survives_store_and_wire(record: JobRecord) -> None:
    assert record_from_json(json.loads(json.dumps(record_to_json(record)))) == record
    assert job_from_pb(pb.Job.FromString(job_to_pb(record).SerializeToString())) == record


@settings(deadline=None)
@given(objects(JobRecord, every_field_set=True))
def test_a_record_with_every_field_set_survives_store_and_wire(record: JobRecord) -> None:
    unset = [
        s.name
        for s in codec.shapes(JobRecord)
        if getattr(record, s.name) is None or (not s.required and getattr(record, s.name) == s.default)
    ]
    assert unset == [], "the strategy must set every field, so that a field a form drops fails this test"
    assert all(io.read_bps is not None and io.write_iops is not None for io in record.limits.io)
    assert record_from_json(json.loads(json.dumps(record_to_json(record)))) == record
    assert job_from_pb(pb.Job.FromString(job_to_pb(record).SerializeToString())) == record


@settings(deadline=None)
@given(objects(Limits))
def test_limits_survive_the_wire(limits: Limits) -> None:
    assert limits_from_pb(pb.Limits.FromString(limits_to_pb(limits).SerializeToString())) == limits


# -- records written by the previous version ----------------------------------------------------------------------

T0 = dt.datetime(2026, 12, 1, 9, 0, 0, 123456, tzinfo=dt.UTC)
FORMAT_1 = JobRecord(
    id="0b7d1b1e-5f0e-4b8e-9a59-6f2f3c1d2e4f",
    owner="CN=alice,O=Example",
    command=(b"sh", b"-c", b"echo \xff \xc3\xa9"),
    status=JobStatus.STOPPED,
    reason="stopped by owner",
    exit_code=None,
    signal=15,
    oom_killed=True,
    pids_limit_hit=True,
    pid=42,
    started_at=T0,
    ended_at=T0 + dt.timedelta(seconds=2),
    limits=Limits(
        cpu=0.5, memory_bytes=64 << 20, pids=20, io=(IoLimit("254:0", 1, 2, 3, 4), IoLimit("8:0", write_bps=1 << 20))
    ),
    usage=Usage(1.5, 4, 1000, 5, 6),
    output_bytes=12,
    uid=61184,
    output_dropped_bytes=7,
    output_lost_bytes=8,
    timeout_seconds=30.0,
    workdir="/var/tmp/jobsvc/0b7d1b1e",
)


def test_a_record_file_of_the_previous_version_loads_and_is_written_back_byte_for_byte(tmp_path: Path) -> None:
    # data/record-format-1.json was written by JobStore.save before the forms were derived (commit 2bddfd6)
    old = (DATA / "record-format-1.json").read_bytes()
    store = JobStore(tmp_path / "state", durable=False)
    try:
        job_dir = store.job_dir(FORMAT_1.id)
        job_dir.mkdir()
        (job_dir / "record.json").write_bytes(old)
        assert store.load(FORMAT_1.id) == FORMAT_1
        shutil.rmtree(job_dir)
        store.save(FORMAT_1)
        assert (job_dir / "record.json").read_bytes() == old
    finally:
        store.close()


def test_a_record_missing_later_fields_or_holding_nulls_gets_the_defaults() -> None:
    d = json.loads((DATA / "record-format-1.json").read_text())
    for name in ("pids_limit_hit", "output_dropped_bytes", "output_lost_bytes", "timeout_seconds", "workdir", "usage"):
        del d[name]
    d.update(output_bytes=None, oom_killed=None, limits=None)
    again = record_from_json(d)
    assert again == dataclasses.replace(
        FORMAT_1,
        pids_limit_hit=False,
        output_dropped_bytes=0,
        output_lost_bytes=0,
        timeout_seconds=None,
        workdir=None,
        usage=Usage(),
        output_bytes=0,
        oom_killed=False,
        limits=Limits(),
    )


def test_records_without_limits_share_one_limits_object() -> None:
    d = record_to_json(dataclasses.replace(FORMAT_1, limits=Limits()))
    first, second = record_from_json(json.loads(json.dumps(d))), record_from_json(json.loads(json.dumps(d)))
    assert first.limits == Limits() and first.limits is second.limits  # 50,000 kept records, one object


def test_an_annotation_without_a_derived_form_is_refused_when_the_converter_is_made() -> None:
    odd = dataclasses.make_dataclass("Odd", [("when", dt.date)], frozen=True)
    with pytest.raises(TypeError, match=r"Odd.when: no derived form"):
        codec.shapes(odd)
    maybe = dataclasses.make_dataclass("Maybe", [("io", tuple[IoLimit, ...] | None)], frozen=True)
    with pytest.raises(TypeError, match=r"Maybe.io: a tuple field is never None"):
        codec.shapes(maybe)


def test_a_record_read_with_every_key_and_one_read_leniently_share_their_default_objects() -> None:
    whole = record_to_json(dataclasses.replace(FORMAT_1, limits=Limits(), usage=Usage()))
    partial = dict(whole)
    del partial["workdir"]  # an older record: the lenient reading
    a, b = record_from_json(whole), record_from_json(partial)
    assert a.limits is b.limits and a.usage is b.usage and a.limits == Limits()
    assert a == dataclasses.replace(b, workdir=whole["workdir"])


def test_what_a_record_cannot_hold_is_the_error_it_always_was() -> None:
    whole = record_to_json(FORMAT_1)
    with pytest.raises(ValueError, match="'gone' is not a valid JobStatus"):
        record_from_json({**whole, "status": "gone"})
    with pytest.raises(TypeError):
        record_from_json({**whole, "argv": ["sh", 1]})
    with pytest.raises(KeyError, match="owner"):
        record_from_json({k: v for k, v in whole.items() if k != "owner"})
    with pytest.raises(ValueError):
        record_from_json({**whole, "started_at": "yesterday"})


def test_argv_that_were_not_utf8_come_back_as_the_same_bytes() -> None:
    record = dataclasses.replace(FORMAT_1, command=(b"printf", b"\xff\xfe", b"caf\xc3\xa9", b""))
    assert record_from_json(json.loads(json.dumps(record_to_json(record)))).command == record.command


def test_a_dataclass_with_a_post_init_is_decoded_through_its_init() -> None:
    @dataclasses.dataclass(frozen=True)
    class Checked:
        n: int = 0
        label: str = ""

        def __post_init__(self) -> None:
            if self.n < 0:
                raise ValueError("negative")

    decode = codec.store_decoder(Checked)
    assert decode({"n": 2, "label": "x"}) == Checked(2, "x") and decode({}) == Checked()
    with pytest.raises(ValueError, match="negative"):
        decode({"n": -1})
