"""Blocked event loops and contention: what held the request, not the stage that waited.

An awaited stage (a Redis call, a queue wait, a downstream request) measures the
time until its coroutine runs again. When the event loop cannot run (one
callback hogs it, or other threads hold the GIL or the CPUs), the awaited stage
looks slow while the thing it awaited answered long ago. This module measures
the loop and names what held it:

* **Heartbeat.** The first stage or ``request()`` that runs inside an asyncio
  loop (any loop: asyncio's, uvloop, nothing is patched) starts a periodic
  ``call_later`` callback on it. Each run records how late it ran into the
  ``inference.runtime.event_loop.delay`` histogram (seconds; the measure of the
  OpenTelemetry semantic conventions' ``nodejs.eventloop.delay.*`` and Node's
  ``monitorEventLoopDelay``).
* **Watchdog.** One daemon thread per process wakes when a heartbeat is overdue
  by :envvar:`OTEL_INFERENCE_EVENT_LOOP_THRESHOLD` and, while the loop is still
  held, samples the loop thread's top Python frames (``sys._current_frames()``:
  function, file, line from code objects; never locals) and the CPU clocks of
  every Python thread (``time.pthread_getcpuclockid``).
* **Blocked intervals.** A heartbeat at least the threshold late ends a blocked
  interval, classified as

  - ``busy``: the loop thread was on CPU (at least half the interval) running a
    callback: the culprit is its innermost sampled function;
  - ``blocked``: the loop thread was off CPU inside a callback while no other
    thread used the CPU: a blocking call (``time.sleep``, synchronous I/O, a
    lock): the culprit is the function that made it;
  - ``starved``: the loop thread was ready but not running while other threads
    used the CPU (they held the GIL, or the CPUs were oversubscribed): the
    culprits are those threads, by name, with their CPU time;
  - ``unknown``: too short for the watchdog to sample, and nothing else ran.

  The interval starts half a heartbeat period before the heartbeat was due (the
  centred estimate: the hold began somewhere in the last period) and ends when
  the heartbeat ran.
* **Attribution.** Every stage span and ``request()`` span recorded on the loop's
  thread that overlaps blocked intervals gets the overlap
  (``inference.event_loop.blocked.duration``, ``...count``), the main culprit
  (``inference.event_loop.blocked.culprit`` and ``...kind``) and one
  ``event_loop.blocked`` event per interval. Synchronous stages (those on a
  thread without a running loop) get their thread CPU time,
  ``inference.stage.cpu.duration``, beside the wall time: a CPU-bound stage
  whose wall time is far above its CPU time was held by contention.

The monitor belongs to one process: after ``fork()`` it restarts itself in the
child on first use (:meth:`LoopMonitor.restart_after_fork` does it explicitly).

Usage::

    from otel_inference.event_loop import loop_monitor

    loop_monitor().start(threshold_s=0.02)   # done by the ``inference_runtime`` instrumentor
    # every loop that runs a stage or request() is watched from then on
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping
from time import perf_counter_ns, time_ns
from typing import Any

from opentelemetry import metrics

from otel_inference import semconv
from otel_inference.config import ConfigurationError
from otel_inference.environment_variables import OTEL_INFERENCE_EVENT_LOOP_THRESHOLD
from otel_inference.runtime import gc_monitor

EVENT_LOOP_DELAY = semconv.EVENT_LOOP_DELAY
EVENT_LOOP_BLOCKED = "event_loop.blocked"  # span event name
BLOCKED_DURATION = semconv.INFERENCE_EVENT_LOOP_BLOCKED
BLOCKED_COUNT = semconv.INFERENCE_EVENT_LOOP_BLOCKED_COUNT
BLOCKED_KIND = semconv.INFERENCE_EVENT_LOOP_BLOCKED_KIND
BLOCKED_CULPRIT = semconv.INFERENCE_EVENT_LOOP_BLOCKED_CULPRIT
BLOCKED_STACK = "inference.event_loop.blocked.stack"
BLOCKED_CPU_RATIO = "inference.event_loop.blocked.cpu_ratio"
BLOCKED_THREADS = "inference.event_loop.blocked.threads"  # names and CPU time in the hold
STAGE_CPU_DURATION = semconv.INFERENCE_STAGE_CPU
KINDS = ("busy", "blocked", "starved", "unknown")

DEFAULT_THRESHOLD_S = 0.02
HEARTBEAT_S = 0.01
"""Heartbeat period: the resolution of the delay histogram (Node's default, 10 ms)."""
_MAX_INTERVALS = 2048  # per loop, newest kept
_MAX_SAMPLES = 64  # frame samples per blocked interval
_MAX_FRAMES = 6  # innermost frames kept per sample
_MAX_EVENTS_PER_SPAN = 8
_MAX_THREADS_NAMED = 3
_DELAY_BOUNDARIES = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
# Frames of the loop machinery itself: the callback is the first frame above them.
_LOOP_FILES = (
    os.path.dirname(asyncio.__file__) + os.sep,
    selectors.__file__,
)
_THREADING_FILE = threading.__file__
_NATIVE = "threads outside Python"  # the process's CPU time no Python thread's clock has
_STARVED_LAG_NS = 2_000_000  # the watchdog itself waited this long for the GIL/CPU
_SAMPLE_STEP_NS = 2_000_000  # watchdog sampling step while a heartbeat is overdue
_IDLE_BEATS = 100  # heartbeats without any stage (1 s) before the loop counts as idle
_IDLE_HEARTBEAT_NS = 250_000_000  # the heartbeat period of an idle loop


def event_loop_threshold(environ: Mapping[str, str] | None = None) -> float:
    """:envvar:`OTEL_INFERENCE_EVENT_LOOP_THRESHOLD` in seconds (default 20 ms)."""
    from otel_inference.budgets import parse_duration

    environ = os.environ if environ is None else environ
    raw = environ.get(OTEL_INFERENCE_EVENT_LOOP_THRESHOLD, "").strip()
    if not raw:
        return DEFAULT_THRESHOLD_S
    seconds = parse_duration(raw, entry=raw, source=OTEL_INFERENCE_EVENT_LOOP_THRESHOLD)
    return check_threshold(seconds, OTEL_INFERENCE_EVENT_LOOP_THRESHOLD)


def check_threshold(seconds: float, source: str = "event_loop_threshold") -> float:
    """A usable threshold: from 5 ms (a heartbeat normally runs up to 1 ms late:
    the selector's timeout is whole milliseconds) to a minute."""
    if not 0.005 <= seconds <= 60:
        raise ConfigurationError(
            f"{source}={seconds:g}s must be from 5ms to 60s (the time a loop may be held "
            "before the watchdog names what held it)"
        )
    return seconds


class BlockedInterval:
    """A time the loop could not run, longer than the threshold (``perf_counter_ns``)."""

    __slots__ = (
        "cpu_ratio",
        "culprit",
        "end_ns",
        "file",
        "function",
        "kind",
        "line",
        "stack",
        "start_ns",
        "threads",
        "wall_start_ns",
    )

    def __init__(self, start_ns: int, end_ns: int) -> None:
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.wall_start_ns = time_ns() - (perf_counter_ns() - start_ns)
        self.kind = "unknown"
        self.culprit = "unknown"
        self.cpu_ratio = 0.0
        self.function: str | None = None
        self.file: str | None = None
        self.line: int | None = None
        self.stack: tuple[str, ...] = ()
        self.threads: tuple[tuple[str, float], ...] = ()  # (name, CPU seconds)

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    def event_attributes(self) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            BLOCKED_KIND: self.kind,
            BLOCKED_CULPRIT: self.culprit,
            BLOCKED_DURATION: self.duration_ns / 1e9,
            BLOCKED_CPU_RATIO: round(self.cpu_ratio, 3),
        }
        if self.function is not None:
            attributes["code.function.name"] = self.function
            attributes["code.file.path"] = self.file
            attributes["code.line.number"] = self.line
        if self.stack:
            attributes[BLOCKED_STACK] = list(self.stack)
        if self.threads:
            attributes["thread.name"] = self.threads[0][0]
            attributes[BLOCKED_THREADS] = [
                f"{name}: {seconds:.4f} s CPU" for name, seconds in self.threads
            ]
        return attributes


class _Stall:
    """What the watchdog saw while a heartbeat was overdue."""

    __slots__ = ("due_ns", "frames", "lag_ns", "snapshot", "times")

    def __init__(self, due_ns: int, snapshot: _Snapshot) -> None:
        self.due_ns = due_ns
        self.snapshot = snapshot
        self.frames: list[tuple[tuple[str, str, int], ...]] = []  # innermost first
        self.times: list[int] = []  # perf_counter_ns of each sample
        self.lag_ns = 0


class _Snapshot:
    """CPU clocks at one instant: each Python thread's, and the whole process's."""

    __slots__ = ("at_ns", "gc_ns", "process_ns", "run_delay", "threads")

    def __init__(self) -> None:
        threads: dict[int, tuple[str, int]] = {}
        for thread in threading.enumerate():
            ident = thread.ident
            if ident is None:
                continue
            try:
                threads[ident] = (
                    thread.name,
                    time.clock_gettime_ns(time.pthread_getcpuclockid(ident)),
                )
            except (OSError, AttributeError):  # exited meanwhile, or no per-thread clocks
                continue
        self.threads = threads
        self.process_ns = time.process_time_ns()
        self.gc_ns = _GC.total_pause_ns
        # Time each loop thread spent runnable but waiting for a CPU (Linux).
        self.run_delay = {
            watch.thread_id: _run_delay(watch.schedstat_fd)
            for watch in list(_monitor._watches.values())
            if watch.schedstat_fd is not None
        }
        self.at_ns = perf_counter_ns()


def _schedstat_fd() -> int | None:
    """This thread's ``schedstat`` (on-CPU ns, run-queue wait ns, slices), kept open."""
    try:
        return os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)
    except (OSError, AttributeError):
        return None


def _run_delay(fd: int) -> int:
    try:
        return int(os.pread(fd, 128, 0).split()[1])
    except (OSError, ValueError, IndexError):
        return 0


class _LoopWatch:
    """The heartbeat of one loop, run on that loop's thread."""

    def __init__(self, monitor: LoopMonitor, loop: asyncio.AbstractEventLoop) -> None:
        self.monitor = monitor
        self.loop = loop
        self.thread_id = threading.get_ident()
        self.schedstat_fd = _schedstat_fd()
        self.intervals: deque[BlockedInterval] = deque(maxlen=_MAX_INTERVALS)
        self.due_ns = 0
        self.last_ns = 0
        self.last_cpu_ns = 0  # the loop thread's CPU clock at last_ns
        self.stall: _Stall | None = None
        self.paused = False  # the watchdog saw the loop stopped: next lateness is no delay
        self.active = True
        # Idle loops beat slowly (a wake costs ~0.1 ms of CPU on a busy VM); any
        # stage on the loop speeds the heartbeat up again at once.
        self.period_ns = monitor.period_ns
        self.slow = False
        self.touched = True  # a stage started or ended since the last heartbeat
        self._idle_beats = 0
        self._handle: asyncio.TimerHandle | None = None

    def begin(self) -> None:
        self.last_cpu_ns = time.thread_time_ns()
        self.last_ns = perf_counter_ns()
        self.due_ns = self.last_ns + self.period_ns
        self._schedule(self.period_ns / 1e9)

    def speed_up(self) -> None:
        """A stage on a slow (idle) loop: back to the full-resolution heartbeat now."""
        self.touched = True
        if not self.slow:
            return
        self.slow = False
        self._idle_beats = 0
        handle = self._handle
        if handle is not None:
            handle.cancel()
        self.period_ns = self.monitor.period_ns
        self.begin()

    def close_fd(self) -> None:
        fd, self.schedstat_fd = self.schedstat_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def cancel(self) -> None:
        self.active = False
        handle = self._handle
        if handle is not None:
            with contextlib.suppress(RuntimeError):  # loop closed
                self.loop.call_soon_threadsafe(handle.cancel)

    def _beat(self) -> None:
        if not self.active:
            return
        now = perf_counter_ns()
        if now < self.due_ns:
            # A stage closed the last interval early (catch_up): wait for the new due time.
            self._schedule((self.due_ns - now) / 1e9)
            return
        if self.touched:
            self.touched = False
            self._idle_beats = 0
        else:
            self._idle_beats += 1
            if self._idle_beats >= _IDLE_BEATS and not self.slow:
                self.slow = True
        # The period of the beat scheduled now (its due time's estimate uses it).
        period = _IDLE_HEARTBEAT_NS if self.slow else self.monitor.period_ns
        self._close(now, period)
        self._schedule(period / 1e9)

    def catch_up(self) -> None:
        """On the loop thread, when the heartbeat is overdue past the threshold:
        the loop is running again, so the held interval is over; close it now,
        so that the stage ending here (resumed in the same loop iteration as the
        heartbeat, before it) sees it."""
        now = perf_counter_ns()
        if now - self.due_ns >= self.monitor.threshold_ns:
            self._close(now, self.period_ns)

    def _schedule(self, seconds: float) -> None:
        try:
            self._handle = self.loop.call_later(seconds, self._beat)
        except RuntimeError:  # loop closing
            self.active = False

    def _close(self, now: int, next_period_ns: int) -> None:
        monitor = self.monitor
        try:
            delay_ns = max(0, now - self.due_ns)
            stall, self.stall = self.stall, None
            if self.paused:
                self.paused = False  # the loop was stopped, not held
            else:
                monitor.record_delay(delay_ns / 1e9)
                if delay_ns >= monitor.threshold_ns:
                    interval = self._interval(now, stall)
                    self.intervals.append(interval)
                    monitor.record_blocked(interval)
        except Exception:  # pragma: no cover - never break the loop
            monitor.log_error()
        self.last_cpu_ns = time.thread_time_ns()
        self.last_ns = now
        self.period_ns = next_period_ns
        self.due_ns = now + next_period_ns

    def _interval(self, now: int, stall: _Stall | None) -> BlockedInterval:
        """The held interval ending now. It began after the last heartbeat; by
        default, half a period before this one was due (the centred estimate).
        When the loop thread was off CPU while held (blocked, starved), the CPU
        it used since the last heartbeat ran before the hold: the hold cannot
        have begun earlier than the last heartbeat plus that CPU time."""
        monitor = self.monitor
        start = max(self.last_ns, self.due_ns - self.period_ns // 2)
        interval = BlockedInterval(start, now)
        if stall is not None and stall.due_ns != self.due_ns:
            stall = None  # seen for an earlier heartbeat
        _classify(interval, stall, monitor.snapshot)
        dated = _culprit_start(interval, stall)
        if dated is not None:
            if dated > start:
                interval.wall_start_ns += dated - start
                interval.start_ns = dated
        elif interval.cpu_ratio < 0.5:
            busy_until = self.last_ns + (time.thread_time_ns() - self.last_cpu_ns)
            if start < busy_until < now:
                interval.start_ns = busy_until
                interval.wall_start_ns += busy_until - start
        return interval


def _classify(interval: BlockedInterval, stall: _Stall | None, before: _Snapshot | None) -> None:
    """Busy, blocked or starved, from the watchdog's samples and the CPU clocks
    between its snapshot (taken before, or early in, the interval) and now."""
    begin = stall.snapshot if stall is not None else before
    if begin is None:
        return
    end = _Snapshot()
    loop_id = threading.get_ident()
    wall = max(1, end.at_ns - begin.at_ns)
    loop_cpu = _delta(begin, end, loop_id)
    interval.cpu_ratio = min(1.0, loop_cpu / wall)
    others: list[tuple[str, float]] = []
    python_ns = 0
    for ident, (name, _cpu) in end.threads.items():
        used = _delta(begin, end, ident)
        python_ns += used
        if ident not in (loop_id, _monitor._watchdog_ident) and used > 0:
            others.append((name, used / 1e9))
    other_python_ns = sum(seconds for _, seconds in others) * 1e9
    native_ns = max(0, (end.process_ns - begin.process_ns) - python_ns)
    if native_ns > 0.1 * wall:
        others.append((_NATIVE, native_ns / 1e9))
    others.sort(key=lambda item: -item[1])
    other_ns = sum(seconds for _, seconds in others) * 1e9
    gc_ns = end.gc_ns - begin.gc_ns
    if gc_ns >= 0.5 * (interval.end_ns - interval.start_ns):
        interval.kind = "busy"
        interval.culprit = "garbage collection"  # stable: the gc.pause events say how long
        return
    samples = stall.frames if stall is not None else []
    callbacks = [sample for sample in samples if sample]
    lag_ns = stall.lag_ns if stall is not None else 0
    # Threads of this process ran more than the loop thread did (even when the
    # CPUs are short, a GIL holder gets some CPU while the loop gets none).
    others_ran = other_ns > loop_cpu and other_ns >= 0.1 * wall
    # Runnable: on CPU, or waiting for one (Linux run-queue time).
    queued = end.run_delay.get(loop_id, 0) - begin.run_delay.get(loop_id, 0)
    runnable = loop_cpu + queued >= 0.5 * wall
    if stall is None:
        # Held past the threshold, yet the watchdog could not run once to sample
        # it: the GIL (or every CPU) was taken, by the loop's callback or others.
        # Other Python threads that used about the hold's length of CPU held the GIL
        # through it: the loop's own ratio misleads when the snapshot came well before
        # the hold (its earlier callbacks' CPU counts in it; seen on throttled CPUs).
        held_ns = interval.end_ns - interval.start_ns
        starved = interval.cpu_ratio < 0.5 or other_python_ns >= 0.9 * held_ns
        interval.kind = "starved" if starved else "busy"
    elif callbacks and interval.cpu_ratio >= 0.5:
        interval.kind = "busy"  # CPU work in a callback
    elif lag_ns >= 0.5 * wall:
        # The watchdog, too, waited most of the hold to run: the GIL (or every
        # CPU) was taken from both threads, whatever the loop was doing before.
        interval.kind = "starved"
    elif others_ran and (not callbacks or lag_ns >= _STARVED_LAG_NS):
        interval.kind = "starved"  # other threads held the GIL
    elif callbacks and runnable:
        interval.kind = "busy"  # CPU work in a callback (slowed further if CPUs are short)
    elif not callbacks and queued >= 0.5 * wall:
        interval.kind = "starved"  # ready to poll, waiting for a CPU
    elif callbacks:
        interval.kind = "blocked"  # off CPU inside a callback: a blocking call
    else:
        interval.kind = "starved"  # the loop was polling, yet was not scheduled
    if interval.kind in ("busy", "blocked"):
        if not callbacks:
            interval.culprit = "a callback (not sampled: shorter than the watchdog's detection)"
            return
        top = Counter(sample[0] for sample in callbacks).most_common(1)[0][0]
        function, path, line = top
        interval.function, interval.file, interval.line = function, path, line
        interval.culprit = f"{function} ({_short(path)}:{line})"
        sample = next(s for s in callbacks if s[0] == top)
        interval.stack = tuple(f"{f} ({_short(p)}:{n})" for f, p, n in sample)
    elif interval.kind == "starved":
        named = others[:_MAX_THREADS_NAMED] if others_ran else []
        interval.threads = tuple(named)
        # The thread that took most CPU: a stable name to add up across intervals
        # (all of them, with their CPU time, are on the event: BLOCKED_THREADS).
        if not named:
            interval.culprit = "other processes (CPUs oversubscribed)"
        elif named[0][0] == _NATIVE:
            interval.culprit = f"{_NATIVE} (native pools: torch, BLAS, tokenizers)"
        else:
            interval.culprit = f"thread {named[0][0]!r}"


def _culprit_start(interval: BlockedInterval, stall: _Stall | None) -> int | None:
    """When the culprit (a callback) shows in the samples only from some sample
    on, the hold began between that sample and the one before (the loop was
    doing other, short work until then): the midpoint."""
    if stall is None or interval.function is None or len(stall.times) < 2:
        return None
    culprit = (interval.function, interval.file, interval.line)
    first = len(stall.frames)
    while first > 0 and stall.frames[first - 1][:1] == (culprit,):
        first -= 1
    if first == 0 or first == len(stall.frames):
        return None  # held by it from the first sample on: no better date
    return (stall.times[first - 1] + stall.times[first]) // 2


def _delta(begin: _Snapshot, end: _Snapshot, ident: int) -> int:
    after = end.threads.get(ident)
    if after is None:
        return 0
    before = begin.threads.get(ident)
    return max(0, after[1] - (before[1] if before is not None else 0))


def _short(path: str) -> str:
    """The last two components of a path: enough to find the file, no home directories."""
    parts = path.replace("\\", "/").rsplit("/", 2)
    return "/".join(parts[-2:])


def _callback_frames(frame: Any) -> tuple[tuple[str, str, int], ...]:
    """The innermost frames above the loop machinery, innermost first; empty when
    the loop thread was in the machinery itself (polling for I/O)."""
    found: list[tuple[str, str, int]] = []
    depth = 0
    while frame is not None and depth < 128 and len(found) < _MAX_FRAMES:
        code = frame.f_code
        path = code.co_filename
        if path.startswith(_LOOP_FILES):
            break  # the loop's own frames: the callback (if any) is above
        if path != _THREADING_FILE:  # Event.wait & co. inside a callback: skip
            found.append((getattr(code, "co_qualname", code.co_name), path, frame.f_lineno))
        frame = frame.f_back
        depth += 1
    return tuple(found)


_KIND_ATTRIBUTES = {kind: {BLOCKED_KIND: kind} for kind in KINDS}


def _blocked_counter(meter: metrics.Meter) -> metrics.Counter:
    return meter.create_counter(
        semconv.EVENT_LOOP_BLOCKED,
        unit="s",
        description=(
            "Time the event loop was held past OTEL_INFERENCE_EVENT_LOOP_THRESHOLD, by kind "
            "(busy, blocked, starved, unknown): its rate is the share of time the loop was held"
        ),
    )


def _delay_histogram(meter: metrics.Meter) -> metrics.Histogram:
    return meter.create_histogram(
        EVENT_LOOP_DELAY,
        unit="s",
        description=(
            "How late each event-loop heartbeat ran: time the loop could not run "
            "(semconv nodejs.eventloop.delay, Node's monitorEventLoopDelay)"
        ),
        explicit_bucket_boundaries_advisory=_DELAY_BOUNDARIES,
    )


class LoopMonitor:
    """Watches every loop that runs a stage; one watchdog thread per process."""

    # Slots: every stage call reads ``started`` (the compiled core at its slot).
    __slots__ = (
        "__weakref__",
        "_error_logged",
        "_last",
        "_lock",
        "_pid",
        "_recorder",
        "_stop",
        "_watchdog",
        "_watchdog_ident",
        "_watches",
        "period_ns",
        "period_s",
        "snapshot",
        "started",
        "threshold_ns",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = False
        self.threshold_ns = int(DEFAULT_THRESHOLD_S * 1e9)
        self.period_s = HEARTBEAT_S
        self.period_ns = int(HEARTBEAT_S * 1e9)
        self._recorder: Any = None
        self._pid = os.getpid()
        self._last: _LoopWatch | None = None  # the loop watched last (hot-path check)
        self._watches: dict[int, _LoopWatch] = {}  # loop thread ident -> watch
        self._watchdog: threading.Thread | None = None
        self._watchdog_ident: int | None = None
        self._stop = threading.Event()
        self._error_logged = False
        self.snapshot: _Snapshot | None = None  # the watchdog's latest, outside stalls

    # -- lifecycle ---------------------------------------------------------
    def start(self, threshold_s: float | None = None, recorder: Any = None) -> None:
        if threshold_s is not None:
            self.threshold_ns = int(threshold_s * 1e9)
        if recorder is not None:
            self._recorder = recorder
        self.started = True

    def stop(self) -> None:
        self.started = False
        with self._lock:
            watches, self._watches = self._watches, {}
            self._last = None
            self._stop.set()
            thread, self._watchdog = self._watchdog, None
        for watch in watches.values():
            watch.cancel()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)

    def restart_after_fork(self) -> None:
        """In a forked child: forget the parent's loops and thread (they do not
        exist here); the next stage in a loop starts fresh."""
        self._lock = threading.Lock()
        self._pid = os.getpid()
        for watch in list(self._watches.values()):
            watch.close_fd()  # the parent's threads' files
        self._watches = {}
        self._last = None
        self._watchdog = None
        self._watchdog_ident = None
        self._stop = threading.Event()

    # -- hot path ----------------------------------------------------------
    def observe(self) -> None:
        """Start watching the running loop, if any (cheap when already watched)."""
        loop = asyncio._get_running_loop()
        if loop is not None:
            self._touch(loop)

    def _touch(self, loop: asyncio.AbstractEventLoop) -> None:
        """A stage on ``loop`` (this thread's running loop): watch it, keep it beating fast."""
        watch = self._last
        if watch is not None and watch.loop is loop:
            if watch.slow:
                watch.speed_up()
            else:
                watch.touched = True
            return
        self._watch(loop)

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            if self._pid != os.getpid():
                self.restart_after_fork()
            ident = threading.get_ident()
            with self._lock:
                if not self.started:
                    return
                watch = self._watches.get(ident)
                if watch is None or watch.loop is not loop:
                    if watch is not None:
                        watch.active = False
                    watch = _LoopWatch(self, loop)
                    self._watches[ident] = watch
                    watch.begin()
                self._last = watch
                if self._watchdog is None:
                    self._stop = threading.Event()
                    self._watchdog = threading.Thread(
                        target=self._run_watchdog,
                        args=(self._stop,),
                        name="otel-inference-loop-watchdog",
                        daemon=True,
                    )
                    self._watchdog.start()
        except Exception:
            self.log_error()

    def stage_probe(self, span: Any) -> tuple[int, int] | None:
        """At a stage's start: watch the running loop; for a recording span on a
        thread without a loop (synchronous work), the thread's CPU clock."""
        loop = asyncio._get_running_loop()
        if loop is not None:
            self._touch(loop)
            return None
        if span is None or not span.is_recording():
            return None
        return (threading.get_ident(), time.thread_time_ns())

    def annotate(
        self, span: Any, start_ns: int, end_ns: int, probe: tuple[int, int] | None = None
    ) -> None:
        """Before a recording span ends: the blocked intervals of this thread's
        loop that overlap ``[start_ns, end_ns]``, and for a synchronous stage
        (``probe``: from :meth:`stage_probe`) its thread's CPU time since."""
        try:
            if probe is not None:
                thread, cpu_start_ns = probe
                if thread == threading.get_ident():  # not when recorded later elsewhere
                    span.set_attribute(
                        STAGE_CPU_DURATION, (time.thread_time_ns() - cpu_start_ns) / 1e9
                    )
                return
            watch = self._watches.get(threading.get_ident())
            if watch is None:
                return
            if watch.loop is asyncio._get_running_loop():
                watch.touched = True
                watch.catch_up()
            overlap, hits = blocked_overlap(watch.intervals, start_ns, end_ns)
            if not hits:
                return
            span.set_attribute(BLOCKED_DURATION, overlap / 1e9)
            span.set_attribute(BLOCKED_COUNT, len(hits))
            main = max(hits, key=lambda pair: pair[1])[0]
            span.set_attribute(BLOCKED_KIND, main.kind)
            span.set_attribute(BLOCKED_CULPRIT, main.culprit)
            for interval, _ in sorted(hits, key=lambda pair: -pair[1])[:_MAX_EVENTS_PER_SPAN]:
                span.add_event(
                    EVENT_LOOP_BLOCKED,
                    interval.event_attributes(),
                    timestamp=interval.wall_start_ns,
                )
        except Exception:
            self.log_error()

    def intervals(self) -> list[BlockedInterval]:
        """Every blocked interval still kept, all loops, oldest first."""
        found = [i for watch in list(self._watches.values()) for i in list(watch.intervals)]
        return sorted(found, key=lambda interval: interval.start_ns)

    # -- recording ---------------------------------------------------------
    def record_delay(self, seconds: float) -> None:
        recorder = self._recorder
        if recorder is None:
            from otel_inference.stages import get_recorder

            recorder = self._recorder = get_recorder()
        recorder.instruments(_delay_histogram).record(seconds)

    def record_blocked(self, interval: BlockedInterval) -> None:
        recorder = self._recorder
        if recorder is not None:
            recorder.instruments(_blocked_counter).add(
                interval.duration_ns / 1e9, _KIND_ATTRIBUTES[interval.kind]
            )

    def log_error(self) -> None:
        if not self._error_logged:
            self._error_logged = True
            from otel_inference.stages import log_once

            log_once(
                "event-loop-monitor",
                "otel-inference: the event-loop monitor failed",
                level=40,
            )

    # -- watchdog ----------------------------------------------------------
    def _run_watchdog(self, stop: threading.Event) -> None:
        """Wakes when a heartbeat is due plus one sampling step; while it stays
        overdue, samples the loop thread's frames every step. The first sample
        showing the culprit dates the start of the hold."""
        self._watchdog_ident = threading.get_ident()
        self.snapshot = _Snapshot()
        intended = perf_counter_ns()
        while not stop.is_set():
            now = perf_counter_ns()
            lag = max(0, now - intended)
            step = _SAMPLE_STEP_NS
            wait_ns = 1_000_000_000
            stalled = False
            frames = None
            for ident, watch in list(self._watches.items()):
                if watch.loop.is_closed():
                    with self._lock:
                        if self._watches.get(ident) is watch:
                            del self._watches[ident]
                            watch.close_fd()
                        if self._last is watch:
                            self._last = None
                    continue
                if not watch.loop.is_running():
                    watch.paused = True
                    continue
                due = watch.due_ns
                overdue = now - due
                if overdue < step:
                    wait_ns = min(wait_ns, step - overdue)
                    continue
                stalled = True
                stall = watch.stall
                if stall is None or stall.due_ns != due:
                    # CPU clocks from our last wake outside a stall: they cover
                    # the whole interval, even when we could not run earlier.
                    stall = _Stall(due, self.snapshot or _Snapshot())
                    watch.stall = stall
                stall.lag_ns = max(stall.lag_ns, lag)
                if len(stall.frames) < _MAX_SAMPLES:
                    if frames is None:
                        frames = sys._current_frames()
                    stall.frames.append(_callback_frames(frames.get(ident)))
                    stall.times.append(now)
                elif len(stall.frames) == _MAX_SAMPLES:
                    step = max(step, self.threshold_ns)  # enough samples: slow down
            frames = None
            if not stalled:
                self.snapshot = _Snapshot()
            sleep_ns = step if stalled else max(500_000, wait_ns)
            intended = perf_counter_ns() + sleep_ns
            stop.wait(sleep_ns / 1e9)


def blocked_overlap(
    intervals: deque[BlockedInterval], start_ns: int, end_ns: int
) -> tuple[int, list[tuple[BlockedInterval, int]]]:
    """Total overlap of ``[start_ns, end_ns]`` with the intervals, and each hit."""
    if not intervals or intervals[-1].end_ns <= start_ns:
        return 0, []
    total = 0
    hits: list[tuple[BlockedInterval, int]] = []
    for interval in reversed(intervals):
        if interval.end_ns <= start_ns:
            break
        overlap = min(end_ns, interval.end_ns) - max(start_ns, interval.start_ns)
        if overlap > 0:
            total += overlap
            hits.append((interval, overlap))
    return total, hits


_monitor = LoopMonitor()
_GC = gc_monitor()


def loop_monitor() -> LoopMonitor:
    """The process-wide event-loop monitor (started by the ``inference_runtime`` instrumentor)."""
    return _monitor


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_monitor.restart_after_fork)
