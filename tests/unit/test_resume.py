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
