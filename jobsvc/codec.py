"""What each field of a record dataclass holds, read once from its annotation, and converters derived from that.

One definition per fact: a field is declared once, on its dataclass (and in the proto); its JSON form, its store
form and (in wire.py) its protobuf form follow from its annotation. Each converter is written once per class as
Python source and compiled (what `dataclasses` itself does for `__init__`), so that decoding 50,000 records at a
restart costs what hand-written code did, not a loop over fields per record. Pure and stdlib-only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import sys
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

T = TypeVar("T")

# scalar: int/float/str/bool as they are; enum: its value; time: RFC 3339 (UTC, Z); record: a nested dataclass;
# records: a tuple of them; argv: a tuple of bytes (Linux argv)
Kind = Literal["scalar", "enum", "time", "record", "records", "argv"]
_SCALARS = (int, float, str, bool)

# The one JSON difference: argv are bytes. The JSON form shows them as text (undecodable bytes as \xNN, for people);
# the store keeps them losslessly (os.fsdecode's surrogateescape) under this key beside it.
STORE_KEYS = {"command": "argv"}


@dataclass(frozen=True)
class Shape:
    """One field of a record dataclass: its name, what kind of value it holds, whether None is allowed."""

    name: str
    kind: Kind
    optional: bool  # `X | None`
    type: type  # the scalar, enum or dataclass type (bytes for argv, datetime for time)
    default: Any = dataclasses.MISSING  # the field's default (made once from a default_factory)

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


@functools.cache
def shapes(cls: type) -> tuple[Shape, ...]:
    """The fields of dataclass cls, in declaration order; TypeError for an annotation with no derived form."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        out.append(_shape(cls, f.name, hints[f.name], default))
    return tuple(out)


def _shape(cls: type, name: str, tp: Any, default: Any) -> Shape:
    optional = False
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1 or len(args) != 2:
            raise TypeError(f"{cls.__name__}.{name}: only `X | None` unions have a derived form, not {tp}")
        optional, tp = True, rest[0]
        args = typing.get_args(tp)
    kind: Kind
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis:
        if args[0] is bytes:
            kind, tp = "argv", bytes
        elif dataclasses.is_dataclass(args[0]):
            kind, tp = "records", args[0]
        else:
            raise TypeError(f"{cls.__name__}.{name}: no derived form for a tuple of {args[0]}")
    elif dataclasses.is_dataclass(tp):
        kind = "record"
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        kind = "enum"
    elif tp is dt.datetime:
        kind = "time"
    elif tp in _SCALARS:
        kind = "scalar"
    else:
        raise TypeError(f"{cls.__name__}.{name}: no derived form for {tp}")
    if optional and kind in ("argv", "records"):
        raise TypeError(f"{cls.__name__}.{name}: a tuple field is never None (its empty tuple says none)")
    if kind == "argv" and name not in STORE_KEYS:
        raise TypeError(f"{cls.__name__}.{name}: a bytes field needs its lossless store key in STORE_KEYS")
    return Shape(name, kind, optional, tp, default)


def format_time(t: dt.datetime | None) -> str | None:
    """UTC as RFC 3339 with a trailing Z (microseconds kept)."""
    if t is None:
        return None
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(s: str | None) -> dt.datetime | None:
    if s is None:
        return None
    return dt.datetime.fromisoformat(s)  # it reads a trailing Z (Python 3.11)


def display_arg(arg: bytes) -> str:
    """An argv element as text: UTF-8, with undecodable bytes shown as \\xNN escapes."""
    return arg.decode("utf-8", "backslashreplace")


class Source:
    """The text of one generated function and the names it refers to."""

    def __init__(self) -> None:
        self.names: dict[str, object] = {}

    def ref(self, value: object, hint: str) -> str:
        """A name under which the generated code sees value."""
        for name, seen in self.names.items():
            if seen is value:
                return name
        name = f"_{hint}{len(self.names)}"
        self.names[name] = value
        return name

    def compile(self, name: str, lines: list[str], params: str = "o") -> Any:
        code = "\n".join([f"def {name}({params}):", *(f"    {line}" for line in lines)])
        namespace: dict[str, Any] = {}
        exec(compile(code, f"<jobsvc.codec {name}>", "exec"), dict(self.names), namespace)
        fn = namespace[name]
        fn.__source__ = code  # for a reader (and a failing test) to see what was made
        return fn


# -- the JSON form (what `jobctl --json` prints) and the store's form (the same, plus lossless argv) ---------------


_made: dict[tuple[str, type], Any] = {}


def made_once(kind: str, cls: type, make: Callable[[], Any]) -> Any:
    """make(), once per (kind, class): each converter is written and compiled once."""
    key = (kind, cls)
    fn = _made.get(key)
    if fn is None:
        fn = _made[key] = make()
    return fn


def json_encoder(cls: type[T]) -> Callable[[T], dict[str, Any]]:
    """obj -> its JSON form: a dict with every field, in declaration order."""
    fn: Callable[[T], dict[str, Any]] = made_once("json", cls, lambda: _json_encoder(cls))
    return fn


def _json_encoder(cls: type) -> Any:
    src = Source()
    items = []
    for s in shapes(cls):
        attr = f"o.{s.name}"
        if s.kind == "enum":
            value = _maybe(s, attr, "{}.value")
        elif s.kind == "time":
            value = f"{src.ref(format_time, 'fmt')}({attr})"
        elif s.kind == "record":
            value = _maybe(s, attr, src.ref(json_encoder(s.type), "enc") + "({})")
        elif s.kind == "records":
            value = f"[{src.ref(json_encoder(s.type), 'enc')}(x) for x in {attr}]"
        elif s.kind == "argv":
            value = f"[{src.ref(display_arg, 'arg')}(a) for a in {attr}]"
        else:
            value = attr
        items.append(f"{s.name!r}: {value},")
    return src.compile(f"{cls.__name__}_to_json", ["return {", *items, "}"])


def store_extras(cls: type) -> Iterator[tuple[str, str]]:
    """(field, store key) of each bytes field, which the store keeps losslessly beside its JSON form."""
    return ((s.name, STORE_KEYS[s.name]) for s in shapes(cls) if s.kind == "argv")


def store_decoder(cls: type[T]) -> Callable[[dict[str, Any]], T]:
    """A store dict -> obj. Lenient as a reader of old files must be: a missing or null field gets its default.

    A nested object whose JSON is all defaults decodes to one shared (frozen) instance: most jobs set no limits,
    and a restart keeps 50,000 records.
    """
    fn: Callable[[dict[str, Any]], T] = made_once("store", cls, lambda: _store_decoder(cls))
    return fn


def _store_decoder(cls: type) -> Any:
    """Two readings in one function: every key there (what this jobsvc writes: subscripts, no .get() calls), and,
    at the first KeyError, the lenient one (a missing key gets its default, or is the KeyError it always was)."""
    src = Source()
    strict, lenient = [], []
    for s in shapes(cls):
        key = STORE_KEYS[s.name] if s.kind == "argv" else s.name
        strict.append((s.name, _store_value(src, s, f"o[{key!r}]")))
        lenient.append((s.name, _store_value(src, s, f"o[{key!r}]" if s.required else f"o.get({key!r})")))
    name, made = f"{cls.__name__}_from_store", src.ref(cls, "cls")
    if not _plain_init(cls):
        return src.compile(
            name,
            [
                "try:",
                f"    return {made}({', '.join(f'{n}={v}' for n, v in strict)})",
                "except KeyError:",
                f"    return {made}({', '.join(f'{n}={v}' for n, v in lenient)})",
            ],
        )
    # Every field set in the instance's dict, as a frozen __init__ does one object.__setattr__ call at a time
    # (three quarters of a decode: 20 fields, 50,000 records at a restart); in declaration order, as __init__
    # sets them, so that the dict shares its keys with the class's other instances (as small as __init__'s).
    return src.compile(
        name,
        [
            f"r = {src.ref(object.__new__, 'new')}({made})",
            "d = r.__dict__",
            "try:",
            *(f"    d[{n!r}] = {v}" for n, v in strict),
            "except KeyError:",
            *(f"    d[{n!r}] = {v}" for n, v in lenient),
            "return r",
        ],
    )


def _store_value(src: Source, s: Shape, raw: str) -> str:
    """The expression that decodes field s from raw, its store value (looked at once)."""
    if s.kind == "scalar":
        return raw if s.required or s.optional else _or_default(src, s, raw)
    if s.kind == "enum":
        return _maybe(s, raw, src.ref(_member_of(s.type), "enum") + "({})")
    if s.kind == "time":  # parse_time, inlined
        return f"(None if (v := {raw}) is None else {src.ref(_FROM_ISO, 'parse')}(v))"
    if s.kind == "record":
        decode, shared, empty = _nested_parts(s.type)
        if shared is None:
            return _maybe(s, raw, src.ref(decode, "dec") + "({})")
        shared_ref, empty_ref, decode_ref = src.ref(shared, "shared"), src.ref(empty, "empty"), src.ref(decode, "dec")
        if s.optional:
            return f"(None if (v := {raw}) is None else {shared_ref} if not v or v == {empty_ref} else {decode_ref}(v))"
        return f"({shared_ref} if not (v := {raw}) or v == {empty_ref} else {decode_ref}(v))"
    if s.kind == "records":
        return f"tuple([{src.ref(_nested_decoder(s.type), 'dec')}(x) for x in {raw} or ()])"
    # argv: os.fsencode inlined (a Python function that checks its argument's type first); str.encode unbound,
    # so that a value that is no str is a TypeError, as there
    encode = src.ref(str.encode, "encode")
    return f"tuple([{encode}(a, {_FS_ENCODING!r}, {_FS_ERRORS!r}) for a in {raw}])"


_FROM_ISO = dt.datetime.fromisoformat  # one bound method (each attribute access makes another)
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # os.fsencode's


@functools.cache
def _member_of(cls: type[enum.Enum]) -> Callable[[Any], enum.Enum]:
    """cls(value), by a dict first (an Enum's call is a Python function of its metaclass, 1-2 us)."""
    members: dict[Any, enum.Enum] = {m.value: m for m in cls}

    def member(value: Any) -> enum.Enum:
        try:
            return members[value]
        except (KeyError, TypeError):  # not a value (or unhashable): cls says why, as it always did
            return cls(value)

    return member


def _plain_init(cls: type) -> bool:
    """Whether cls's __init__ only sets its fields (so a decoder may set them itself): a dataclass's own
    __init__, an instance dict, every field an init argument, no __post_init__."""
    params = getattr(cls, "__dataclass_params__", None)
    return (
        params is not None
        and params.init
        and not hasattr(cls, "__slots__")
        and not hasattr(cls, "__post_init__")
        and all(f.init for f in dataclasses.fields(cls))
    )


@functools.cache
def _nested_parts(cls: type) -> tuple[Callable[[Any], Any], Any, dict[str, Any] | None]:
    """A nested object's store decoder, its shared default instance and that one's JSON (None, None without)."""
    decode: Callable[[Any], Any] = store_decoder(cls)
    try:
        shared = cls()
    except TypeError:  # a required field: no default instance to share
        return decode, None, None
    return decode, shared, json_encoder(cls)(shared)


def _nested_decoder(cls: type) -> Callable[[dict[str, Any] | None], Any]:
    """store_decoder for a nested object: None, {} or the all-defaults JSON give one shared default instance."""
    decode, shared, empty = _nested_parts(cls)
    if shared is None:
        return decode

    def nested(d: dict[str, Any] | None) -> Any:
        if not d or d == empty:
            return shared
        return decode(d)

    return nested


def _maybe(s: Shape, raw: str, template: str) -> str:
    """template with raw in its {}, or None where the field is optional and raw is None (raw is looked at once)."""
    if not s.optional:
        return template.format(raw)
    return f"(None if (v := {raw}) is None else {template.format('v')})"


def _or_default(src: Source, s: Shape, raw: str) -> str:
    default = src.ref(s.default, "default")
    if not s.default:  # 0, False, "": `or` also turns a null (or a missing key) into the default
        return f"({raw} or {default})"
    return f"({default} if (v := {raw}) is None else v)"


# -- an object that holds a record's fields as its own attributes (a Job) ---------------------------------------


def from_attributes(cls: type[T], given: tuple[str, ...]) -> Callable[..., T]:
    """(o, **given) -> cls, every field not given taken from o's attribute of the same name."""
    fn: Callable[..., T] = made_once(f"from attributes {given}", cls, lambda: _from_attributes(cls, given))
    return fn


def _from_attributes(cls: type, given: tuple[str, ...]) -> Any:
    src = Source()
    names = [s.name for s in shapes(cls)]
    args = [f"{n}={n}," if n in given else f"{n}=o.{n}," for n in names]
    params = ", ".join(["o", "*", *given])
    return src.compile(f"{cls.__name__}_from_attributes", [f"return {src.ref(cls, 'cls')}(", *args, ")"], params)


def to_attributes(cls: type[T], names: tuple[str, ...]) -> Callable[[object, T], None]:
    """(o, obj) -> None: set o's attributes of these names from obj's fields."""
    fn: Callable[[object, T], None] = made_once(f"to attributes {names}", cls, lambda: _to_attributes(cls, names))
    return fn


def _to_attributes(cls: type, names: tuple[str, ...]) -> Any:
    fields = {s.name for s in shapes(cls)}
    unknown = [n for n in names if n not in fields]
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
    return Source().compile(f"{cls.__name__}_to_attributes", [f"o.{n} = r.{n}" for n in names] or ["pass"], "o, r")
