"""jobctl's resume logic (cli/resume.py) against a fake stream that drops mid-way and a server that is down."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from jobctl.client import ConnectionLostError, Output, UnavailableError
from jobctl.resume import follow

DATA = b"".join(b"line-%d\n" % i for i in range(1, 41))
REFUSED = UnavailableError("cannot reach jobsvc at 127.0.0.1:50051 (Connection refused)")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeServer:
    """Serves DATA in 7-byte chunks; each entry of script is what one open does: an int drops the connection after
    that many chunks, an exception fails the open, None serves to the end."""

    def __init__(self, script: list[int | Exception | None], clock: Clock | None = None, outage: float = 0) -> None:
        self.script = script
        self.opens: list[tuple[int, int | None]] = []
        self.clock, self.outage = clock, outage

    def open(self, position: int, tail: int | None) -> Iterator[Output]:
        self.opens.append((position, tail))
        step = self.script.pop(0) if self.script else None
        if isinstance(step, Exception):
            raise step
        return self._serve(position, step)

    def _serve(self, position: int, drop_after: int | None) -> Iterator[Output]:
        sent = 0
        while position < len(DATA):
            if drop_after is not None and sent == drop_after:
                if self.clock is not None:
                    self.clock.now += self.outage
                raise ConnectionLostError("the connection to jobsvc at 127.0.0.1:50051 was lost (Socket closed)")
            chunk = DATA[position : position + 7]
            yield Output(1, position, chunk)
            position += len(chunk)
            sent += 1


def run(server: FakeServer, clock: Clock, **kw: object) -> tuple[bytes, list[str]]:
    said: list[str] = []
    chunks = follow(server.open, notify=said.append, sleep=clock.sleep, clock=clock, **kw)  # type: ignore[arg-type]
    return b"".join(c.data for c in chunks), said


def test_a_drop_and_a_restart_are_resumed_at_the_next_byte() -> None:
    clock = Clock()
    server = FakeServer([3, REFUSED, REFUSED, None])
    data, said = run(server, clock)
    assert data == DATA  # every byte once, in order
    assert [p for p, _ in server.opens] == [0, 21, 21, 21]
    assert clock.sleeps == [0.5, 1.0, 2.0]  # backoff
    assert said[0].startswith("the connection to jobsvc at 127.0.0.1:50051 was lost (Socket closed)")
    assert "reconnecting for up to 60s to resume at byte 21" in said[0]
    assert said[1] == "still reconnecting: " + str(REFUSED)
    assert said[2] == "reconnected after 3.5s; resuming at byte 21"
    assert len(said) == 3


def test_the_budget_starts_again_after_progress() -> None:
    clock = Clock()
    # three outages of 40 s each (120 s in all) with progress between them: each is within the 60 s budget
    server = FakeServer([2, REFUSED, 2, REFUSED, 2, REFUSED, None], clock, outage=40)
    data, said = run(server, clock)
    assert data == DATA
    assert sum(1 for line in said if line.startswith("reconnected")) == 3


def test_it_gives_up_after_the_budget_without_progress() -> None:
    clock = Clock()
    server = FakeServer([2, *[REFUSED] * 100])
    with pytest.raises(UnavailableError, match=r"Connection refused\); gave up after 10s of reconnecting"):
        run(server, clock, reconnect_for=10.0)
    assert sum(clock.sleeps) == pytest.approx(10.0)
    assert max(clock.sleeps) <= 5.0


def test_a_server_never_reached_fails_at_once() -> None:
    clock = Clock()
    with pytest.raises(UnavailableError, match="Connection refused"):
        run(FakeServer([REFUSED, None]), clock)
    assert clock.sleeps == []
    # ... unless the caller already reached it (jobctl run's Start did)
    data, _ = run(FakeServer([REFUSED, None]), clock, reached=True)
    assert data == DATA


def test_zero_budget_gives_up_at_the_first_drop() -> None:
    with pytest.raises(ConnectionLostError):
        run(FakeServer([2, None]), Clock(), reconnect_for=0.0)


def test_the_tail_is_asked_once_then_the_next_byte() -> None:
    server = FakeServer([1, None])
    data, _ = run(server, Clock(), tail=3)
    assert server.opens == [(0, 3), (7, None)]
    assert data == DATA


def test_a_stream_begun_mid_way_resumes_at_the_byte_after_the_last_one_written() -> None:
    clock = Clock()
    server = FakeServer([2, REFUSED, 1, None])
    data, said = run(server, clock, from_offset=100)
    assert data == DATA[100:]
    assert [p for p, _ in server.opens] == [100, 114, 114, 121]
    assert [line for line in said if line.startswith("reconnected")] == [
        "reconnected after 1.5s; resuming at byte 114",  # slept 0.5 s, refused, slept 1 s
        "reconnected after 0.5s; resuming at byte 121",  # the backoff starts again after progress
    ]


def test_backoff_doubles_to_its_cap_and_starts_again_after_progress() -> None:
    clock = Clock()
    server = FakeServer([1, *[REFUSED] * 6, 1, REFUSED, None])
    data, _ = run(server, clock)
    assert data == DATA
    # 0.5, 1, 2, 4, then the 5 s cap; after bytes came again, the next outage begins at 0.5 s
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 0.5, 1.0]


def test_every_stream_opened_is_closed_the_dropped_ones_too() -> None:
    opened: list[Closable] = []

    def open_stream(position: int, tail: int | None) -> Iterator[Output]:
        stream = Closable(FakeServer([None if opened else 2]).open(position, tail))
        opened.append(stream)
        return stream

    clock = Clock()
    chunks = follow(open_stream, sleep=clock.sleep, clock=clock)
    assert b"".join(c.data for c in chunks) == DATA
    assert len(opened) == 2 and all(s.closed for s in opened)


class Closable:
    """A stream with close(), as grpc's call objects have."""

    def __init__(self, chunks: Iterator[Output]) -> None:
        self.chunks, self.closed = chunks, False

    def __iter__(self) -> Iterator[Output]:
        return self

    def __next__(self) -> Output:
        return next(self.chunks)

    def close(self) -> None:
        self.closed = True


def test_giving_up_names_the_offset_to_go_on_from() -> None:
    clock = Clock()
    server = FakeServer([5, *[REFUSED] * 100])
    with pytest.raises(UnavailableError) as raised:
        run(server, clock, reconnect_for=3.0)
    assert str(raised.value).endswith("(to go on later: jobctl stream --from-offset 35 ID)")
    assert [p for p, _ in server.opens][:2] == [0, 35]


def test_a_drop_after_the_last_byte_says_no_output_came_after() -> None:
    opens: list[int] = []

    def open_stream(position: int, tail: int | None) -> Iterator[Output]:
        opens.append(position)
        if position == 0:
            yield Output(1, 0, DATA)
            raise ConnectionLostError("the connection to jobsvc at 127.0.0.1:50051 was lost (Socket closed)")
        # the job had ended: the reopened stream ends at once

    clock, said = Clock(), list[str]()
    chunks = follow(open_stream, notify=said.append, sleep=clock.sleep, clock=clock)
    assert b"".join(c.data for c in chunks) == DATA
    assert opens == [0, len(DATA)]
    assert said[-1] == f"reconnected after 0.5s; no output after byte {len(DATA)}"


def test_jobctl_stream_resumes_a_dropped_stream_once_and_since_only_places_the_first_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from click.testing import CliRunner
    from jobctl import resume
    from jobctl.main import cli

    monkeypatch.setattr(resume, "FIRST_DELAY", 0.0)  # no real sleep in a unit test
    server = FakeServer([3, None])
    asked: list[tuple[int, int | None]] = []

    class Client:
        def stream(
            self,
            job_id: str,
            from_offset: int,
            follow: bool,
            only: int | None,
            tail: int | None,
            since_ms: int | None,
        ) -> Iterator[Output]:
            asked.append((from_offset, since_ms))
            return server.open(from_offset, tail)

        def close(self) -> None:
            pass

    result = CliRunner().invoke(
        cli, ["stream", "abcd", "--since", "2026-12-01T10:00:00Z"], obj={"client_factory": Client}
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout_bytes == DATA  # each byte once, in order
    assert asked == [(0, 1_796_119_200_000), (21, None)]
    assert "reconnecting for up to 60s to resume at byte 21" in result.stderr
