"""The limits' vocabulary on a command line: click ParamTypes over jobsvc.limits' parsers, for jobsvc and jobctl.

Sizes (64M, 1.5G), CPUs (0.25), durations (90s, 1m30s) and DEV=VALUE throttles read the same in `jobsvc serve`,
in jobctl and in the engine. jobctl imports this at start-up: only click and jobsvc.errors here; the parsers
(jobsvc.limits) are imported on the first value.

Each CLI keeps its own wording of a bad value (its tests and users know them): `what` is the subject the parser
names (None: the option's name), `strip` drops that subject from the message, and `hint` is how click names the
option: "quoted" ('--x', click's own), "bare" (--x) or "none" (no option named).
"""

from __future__ import annotations

from typing import Any, Literal, NoReturn

import click

from jobsvc.errors import InvalidArgumentError

Hint = Literal["quoted", "bare", "none"]


class LimitParam(click.ParamType):
    """A value read by one of jobsvc.limits' parsers; its InvalidArgumentError becomes click's usage error."""

    def __init__(self, what: str | None = None, strip: bool = False, hint: Hint = "quoted") -> None:
        self.what = what
        self.strip = strip
        self.hint = hint

    def subject(self, param: click.Parameter | None) -> str:
        """What the parser's message names: the fixed subject, else the option's name."""
        if self.what is not None:
            return self.what
        return param.name if param is not None and param.name else self.name

    def refuse(
        self, e: InvalidArgumentError, what: str, param: click.Parameter | None, ctx: click.Context | None
    ) -> NoReturn:
        message = e.message.removeprefix(f"{what}: ") if self.strip else e.message
        if self.hint == "bare" and param is not None:
            raise click.BadParameter(message, ctx, param, param_hint=param.opts[0])
        if self.hint == "none":  # not BadParameter: click would name the option it belongs to
            raise click.UsageError(f"Invalid value: {message}", ctx)
        self.fail(message, param, ctx)


class Size(LimitParam):
    """Bytes: 512, 64K, 64M, 1.5G, 2GiB (binary units)."""

    name = "size"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value  # a default already in bytes
        from jobsvc.limits import parse_size

        what = self.subject(param)
        try:
            return parse_size(value, what)
        except InvalidArgumentError as e:
            self.refuse(e, what, param, ctx)


class Cpu(LimitParam):
    """CPUs as a decimal: 0.25 is a quarter of one CPU (positive: refuse 0 and below here, not at the server)."""

    name = "cpus"

    def __init__(self, positive: bool = False, hint: Hint = "quoted") -> None:
        super().__init__("cpu", hint=hint)
        self.positive = positive

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        from jobsvc.limits import parse_cpu

        try:
            cpu = parse_cpu(str(value))
        except InvalidArgumentError as e:
            self.refuse(e, "cpu", param, ctx)
        if self.positive and not cpu > 0:
            self.fail("must be a positive number of CPUs", param, ctx)
        return cpu


class Duration(LimitParam):
    """Seconds as 90, 90s, 1m30s, 2m, 1.5h, 7d, 250ms; zero only when allowed, at most maximum seconds."""

    name = "duration"

    def __init__(
        self,
        what: str | None = None,
        strip: bool = False,
        allow_zero: bool = False,
        maximum: float | None = None,
    ) -> None:
        super().__init__(what, strip)
        self.allow_zero = allow_zero
        self.maximum = maximum

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = repr(value)  # a default or a number from a config file: read like the text
        if not isinstance(value, str):
            self.fail(f"want a duration such as 90s or 1m30s, got {value!r}", param, ctx)
        from jobsvc.limits import parse_duration

        what = self.subject(param)
        try:
            seconds = parse_duration(value, what, allow_zero=self.allow_zero)
        except InvalidArgumentError as e:
            self.refuse(e, what, param, ctx)
        if self.maximum is not None and seconds > self.maximum:
            self.fail(f"{value!r} is more than the maximum of {self.maximum:g}s", param, ctx)
        return seconds


class DeviceValue(LimitParam):
    """DEV=VALUE for one disk: (DEV, a rate in bytes/s with size suffixes) or (DEV, a whole number of operations)."""

    name = "dev=value"

    def __init__(self, what: str, rate: bool, strip: bool = True, hint: Hint = "bare") -> None:
        super().__init__(what, strip, hint)
        self.rate = rate

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value  # already read
        from jobsvc.limits import parse_count, parse_size, split_device_value

        what = self.subject(param)
        try:
            dev, text = split_device_value(str(value), what)
            return dev, parse_size(text, what) if self.rate else parse_count(text, what)
        except InvalidArgumentError as e:
            self.refuse(e, what, param, ctx)
