"""Capture: a job's stdout and stderr moved into its OutputLog by a thread of its own.

A job that writes faster than the disk fills the page cache with dirty pages, and the kernel then makes the thread
that writes them wait (balance_dirty_pages). On the event loop that wait stalled every call and stream of every
user; in the job's own capture thread it stalls only that job's capture (and so, through its full pipe, the job).

Who owns what:
- the capture thread: the pipes (it reads them and closes them at their end), the log's writer side (segment file,
  index records, the writer's figures: see jobsvc/output.py), and what it adds to the budget (Budget.captured);
- the event loop: everything readers see (OutputLog.notify() copies the writer's figures under the log's lock),
  retention, the budget's settled count and its reclaim (which removes other jobs), the job's end.
The thread asks the loop to look with call_soon_threadsafe, coalesced: at most one request in flight, sent when a
reader is waiting, when PUBLISH_INTERVAL has passed, or when the pipes are empty for now. When the user's share is
full the thread asks the loop (which may reclaim) and waits for the answer; the loop never waits for the thread.
The loop learns of the end (done) only after the last byte is in the log and visible, and only then closes the
wake-up eventfd: stop() never writes to a closed or reused descriptor.

One thread per running job: a throttled write blocks the thread doing it, so jobs sharing a thread would stall
each other as they stalled everyone on the loop. But a thread is not started per job: Thread.start() makes the
loop wait until the new thread has been scheduled (milliseconds on a loaded host, and a tenth of the server's CPU
in a churn of short jobs), so a thread whose job ended waits a while for the next one (Threads: a few idle ones
are kept, each still serving one job at a time).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Callable, Sequence

from jobsvc import disk
from jobsvc.budget import Budget
from jobsvc.output import OutputLog

log = logging.getLogger(__name__)

PIPE_SIZE = 1024 * 1024  # fewer wake-ups for chatty jobs; the kernel caps it at fs.pipe-max-size
BATCH = 16  # splices from one pipe before the other gets its turn
PUBLISH_INTERVAL = 0.005  # seconds between requests to the loop while output flows and nobody waits for it
# Output that comes in small writes is taken in pieces of some size: a splice that brings less than PACE_BELOW ends
# its pipe's turn, and after a round that brought some but less, the thread lets the job write for PACE before it
# looks again (output already taken is asked to be shown first). Taken as each write came (1 live jobctl client:
# splices p50 4-16 KiB, 4,000-8,000 of them and 2,000-4,000 requests to the loop per 256 MiB), it woke the reader
# with as little each time (messages p50 4 KiB) and the thread had a third of the server's py-spy samples.
PACE = 0.001
PACE_BELOW = 256 * 1024
# after the disk refused a write, output is dropped without trying to store it for this long: a job printing 4 KiB
# at a time made two index records (a run, then the lost one) per write and used up the index's reserve
DISK_RETRY = 0.1
ANSWER_TIMEOUT = 5.0  # how long the thread waits for the loop's answer on a full share before storing anyway
IDLE_THREADS = 16  # capture threads kept waiting for the next job
IDLE_TIMEOUT = 10.0  # seconds an idle capture thread waits for one before it ends
# How much lower than the event loop a capture thread's CPU priority is (its nice value above the server's). A job
# writing at disk speed keeps its capture thread copying the pipe into the page cache (splice's memcpy: 0.3-0.7 of a
# core at 100-150 MiB/s here); at the loop's priority that thread took the loop's CPU (the loop waited 300-580 ms of
# each second in the run queue, against 50-100 with no writer) and every call waited. Lower, it still gets every
# CPU nobody else wants; a job it slows down waits on its full pipe.
NICE = 10


class Threads:
    """Threads that each run one task at a time (a job's capture); a task goes to an idle thread, else to a new
    one. A thread that finished its task waits up to idle_timeout for the next, unless max_idle already wait; and a
    thread that takes a task when none is left idle starts one more (so the next caller need not wait for a start).
    """

    def __init__(self, max_idle: int = IDLE_THREADS, idle_timeout: float = IDLE_TIMEOUT, nice: int = NICE) -> None:
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.nice = nice
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting on _tasks, less the tasks put there for them
        self._live = 0  # threads of this pool, running a task or idle
        self._spare_due = False  # a spare thread is starting
        self._tasks: queue.SimpleQueue[tuple[str, Callable[[], None]]] = queue.SimpleQueue()

    @property
    def idle(self) -> int:
        """How many threads wait for a task now."""
        return self._idle

    @property
    def live(self) -> int:
        """How many threads the pool has now (busy or idle)."""
        return self._live

    def run(self, name: str, task: Callable[[], None]) -> None:
        """Run task (which must not raise) in a thread named name; raises, running nothing, if no thread could be
        started."""
        with self._lock:
            if self._idle > 0:
                self._idle -= 1  # with the put, under the lock: an idle thread that times out still finds it
                self._tasks.put((name, task))
                return
        self._start(name, task)

    def _start(self, name: str, task: Callable[[], None] | None) -> None:
        with self._lock:
            self._live += 1
        try:
            threading.Thread(target=self._serve, args=(name, task), name=name, daemon=True).start()
        except BaseException:
            with self._lock:
                self._live -= 1
            raise

    def _add_spare(self) -> None:
        """Start an idle thread from this one if none is left (Thread.start waits until it runs: better here than
        in the caller of run, the event loop)."""
        with self._lock:
            if self._idle > 0 or self._spare_due or self.max_idle == 0:
                return
            self._spare_due = True
        try:
            self._start("capture-idle", None)
        except RuntimeError:  # no thread to be had now: run() tries again
            with self._lock:
                self._spare_due = False

    def _serve(self, name: str, task: Callable[[], None] | None) -> None:
        me = threading.current_thread()
        spare = task is None
        lower_priority(self.nice)
        while True:
            if task is not None:
                self._add_spare()
                me.name = name
                task()
                me.name = "capture-idle"
            with self._lock:
                if spare:
                    self._spare_due, spare = False, False
                if self._idle >= self.max_idle:
                    self._live -= 1
                    return
                self._idle += 1
            try:
                name, task = self._tasks.get(timeout=self.idle_timeout)
            except queue.Empty:
                with self._lock:
                    try:  # a task put for this thread as it timed out
                        name, task = self._tasks.get_nowait()
                    except queue.Empty:
                        self._idle -= 1
                        self._live -= 1
                        return


THREADS = Threads()


def lower_priority(nice: int) -> None:
    """Make the calling thread's nice value the process's plus nice (Linux: a thread id names one thread; set from
    the process's, as a thread starts with its creator's, which may be another capture thread's)."""
    if nice <= 0:
        return
    with contextlib.suppress(OSError):  # not allowed or not Linux: the thread keeps its priority
        base = os.getpriority(os.PRIO_PROCESS, os.getpid())  # the main thread's (its id is the process id)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, base + nice))


class Capture:
    """One job's pipes -> its OutputLog, in a thread; done is set on the loop once everything is in the log."""

    def __init__(
        self,
        name: str,
        output: OutputLog,
        budget: Budget,
        pipes: Sequence[tuple[int, int]],
        on_lost: Callable[[OSError | None], None] | None = None,
        threads: Threads = THREADS,
    ) -> None:
        self._name = name
        self._threads = threads
        self._loop = asyncio.get_running_loop()
        self._output = output
        self._budget = budget
        self._pipes = dict(pipes)  # fd -> STDOUT/STDERR; the thread's once started
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._asked = False  # a request to the loop is in flight
        self._asked_at = 0.0
        self._stopping = False  # the thread's: the wake-up eventfd was written
        self._lost = False  # the thread's: some output was lost (told once)
        self._refused: OSError | None = None  # the thread's: the disk's last refusal, until _retry_at
        self._retry_at = 0.0
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.done = asyncio.Event()
        for fd in self._pipes:
            os.set_blocking(fd, False)
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self._ran = threading.Event()  # its thread is done with this capture

    def start(self) -> None:
        """Hand the capture to a thread; from then on the pipes are its own (on failure they are still the
        caller's)."""
        self._output.capture_started()
        try:
            self._threads.run(self._name, self._run)
        except BaseException:
            self._output.capture_ended()
            os.close(self._wake)
            self._wake = -1
            raise

    def stop(self) -> None:
        """Drain what is in the pipes now and end, even though something still holds them open (on the loop)."""
        if self._wake >= 0:
            os.eventfd_write(self._wake, 1)

    def join(self, timeout: float | None = None) -> None:
        """Wait until its thread is done with this capture (tests; the loop awaits done instead)."""
        self._ran.wait(timeout)

    # -- the thread -------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._capture()
        except Exception:
            log.exception("capture thread %s failed", self._name)
        finally:
            for fd in self._pipes:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._pipes.clear()
            with contextlib.suppress(OSError):
                self._output.end_writes()
            self._call(self._finished)
            self._ran.set()

    def _capture(self) -> None:
        poller = select.poll()
        for fd in self._pipes:
            poller.register(fd, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        while self._pipes:
            moved, hung_up = 0, False
            for fd, events in poller.poll():
                if fd == self._wake:
                    self._stopping = True
                elif fd in self._pipes:
                    hup = bool(events & select.POLLHUP)  # the job's end is near: take the rest at once
                    hung_up |= hup
                    n, at_end = self._drain(fd, chase=hup)
                    moved += n
                    if at_end:
                        poller.unregister(fd)
                        os.close(fd)
                        del self._pipes[fd]
            if self._stopping:  # what is in the pipes now, once, then end
                for fd in list(self._pipes):
                    self._drain(fd, chase=True)
                return
            self._ask()  # the pipes are empty for now (or had their turn): show what arrived
            if 0 < moved < PACE_BELOW and not hung_up:
                time.sleep(PACE)  # small writes: let the job fill the pipe rather than take each as it comes

    def _still_refused(self) -> bool:
        """Within DISK_RETRY of the disk's last refusal and still no room for a pipe's worth: output is dropped
        without trying (output written once room returns is stored at once).

        A full filesystem shows in statvfs; a quota (EDQUOT: the user's or the directory's project) does not, so
        there the room is asked for where the next bytes go (blocks allocated count against the quota)."""
        refused = self._refused
        if refused is None or time.monotonic() >= self._retry_at:
            return False
        if refused.errno == errno.EDQUOT:
            room = self._output.room_for(PIPE_SIZE)
            return room is None or not room  # cannot be told: hold off until DISK_RETRY, never retry each write
        return not disk.has_room(self._output.directory, PIPE_SIZE)

    def _drain(self, fd: int, chase: bool) -> tuple[int, bool]:
        """Up to BATCH splices from one pipe (unless chase, only while each brings PACE_BELOW or more); the bytes
        taken, and True at its end."""
        tag, output, budget = self._pipes[fd], self._output, self._budget
        moved = 0
        for _ in range(BATCH):
            try:
                if budget.over and self._full():  # this user's share is full: never anyone else's room
                    n = self._discard(fd, None)
                elif self._still_refused():
                    n = self._discard(fd, self._refused)
                else:
                    n = output.splice_from(tag, fd, PIPE_SIZE)
                    budget.captured(n)
            except BlockingIOError:
                return moved, False
            except OSError as e:  # the state dir's disk refused: keep the job unblocked, count the loss
                self._refused, self._retry_at = e, time.monotonic() + DISK_RETRY
                n = self._discard(fd, e)
            if n == 0:
                return moved, True
            if n < 0:  # nothing more in the pipe now
                return moved, False
            moved += n
            if output.wanted or time.monotonic() - self._asked_at >= PUBLISH_INTERVAL:
                self._ask()
            # the pipe is about empty (the job writes in small pieces); over the share, though, the next turn
            # has the loop reclaim at once
            if n < PACE_BELOW and not chase and not budget.over:
                return moved, False
        return moved, False

    def _discard(self, fd: int, err: OSError | None) -> int:
        try:
            data = os.read(fd, PIPE_SIZE)
        except BlockingIOError:
            return -1
        if data:
            if not self._lost and self._on_lost is not None:
                self._on_lost(err)
            self._lost = True
            self._output.skip_lost(len(data))  # readers see the gap where it is
        return len(data)

    def _full(self) -> bool:
        """The loop's answer: is the share still full after reclaiming? (Store when there is no answer.)"""
        answer: concurrent.futures.Future[bool] = concurrent.futures.Future()

        def ask() -> None:
            try:
                full = self._budget.full()
            except Exception:  # a failed reclaim must not end the capture: store, as with no share
                log.exception("capture %s: reclaiming the share failed", self._name)
                full = False
            answer.set_result(full)

        if not self._call(ask):
            return False
        try:
            return answer.result(ANSWER_TIMEOUT)
        except TimeoutError:
            return False

    def _ask(self) -> None:
        """Ask the loop to publish what was written, unless a request is in flight already."""
        with self._lock:
            if self._asked:
                return
            self._asked = True
        self._asked_at = time.monotonic()
        self._call(self._publish)

    def _call(self, fn: Callable[[], None]) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            return False
        return True

    # -- the loop ---------------------------------------------------------------------------------------------------

    def _publish(self) -> None:
        with self._lock:
            self._asked = False  # before reading the figures: a change after this asks again
        output, start = self._output, self._output.start
        self._budget.settle()
        output.notify()  # what readers see, and the per-job cap applied
        self._budget.used -= output.start - start  # what the per-job cap just dropped

    def _finished(self) -> None:
        self._publish()
        os.close(self._wake)
        self._wake = -1
        self._output.capture_ended()
        self.done.set()
