"""Follow a job's output across dropped connections and server restarts: resume at the next byte, with backoff.

The budget is time without progress: it starts when the connection is lost and starts again with every byte that
arrives, so a long stream survives any number of restarts as long as each one is over within the budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator

from .client import ConnectionLostError, Output, UnavailableError

FIRST_DELAY = 0.5
MAX_DELAY = 5.0


def _span(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"


def follow(
    open_stream: Callable[[int, int | None], Iterator[Output]],
    from_offset: int = 0,
    tail: int | None = None,
    *,
    reconnect_for: float = 60.0,
    reached: bool = False,
    notify: Callable[[str], None] = lambda line: None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Generator[Output, None, None]:
    """The output chunks from from_offset (or the last tail lines) to the end, each byte once and in order.

    open_stream(position, tail) opens one stream. A connection lost mid-stream is reopened at the next byte for up
    to reconnect_for seconds without progress; a server that cannot be reached is retried only once it has been
    reached (reached=True says the caller already talked to it), so a wrong --target fails at once. notify gets
    one line for each thing that happened (lost, still down with another reason, reconnected).
    """
    position = from_offset
    lost_at: float | None = None  # when the current outage began
    delay = FIRST_DELAY
    last_reason = ""
    while True:
        stream: Iterator[Output] | None = None
        try:
            stream = open_stream(position, tail)
            for chunk in stream:
                if lost_at is not None:
                    notify(f"reconnected after {_span(clock() - lost_at)}; resuming at byte {position}")
                    lost_at, delay, last_reason = None, FIRST_DELAY, ""
                reached = True
                position = chunk.offset + len(chunk.data)
                tail = None  # the tail is written; from now on go on from the next byte
                yield chunk
            if lost_at is not None:
                notify(f"reconnected after {_span(clock() - lost_at)}; no output after byte {position}")
            return
        except UnavailableError as e:
            if not (reached or isinstance(e, ConnectionLostError)) or reconnect_for <= 0:
                raise
            reached = True
            now = clock()
            if lost_at is None:
                lost_at = now
                notify(f"{e}; reconnecting for up to {_span(reconnect_for)} to resume at byte {position}")
            elif str(e) != last_reason:
                notify(f"still reconnecting: {e}")
            last_reason = str(e)
            left = lost_at + reconnect_for - now
            if left <= 0:
                raise UnavailableError(
                    f"{e}; gave up after {_span(now - lost_at)} of reconnecting "
                    f"(to go on later: jobctl stream --from-offset {position} ID)"
                ) from None
            sleep(min(delay, left))
            delay = min(delay * 2, MAX_DELAY)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
