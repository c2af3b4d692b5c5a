"""Clocks, and the CUDA sync-aware timer behind device-timed stages.

CUDA work is asynchronous: host wall time around a forward pass measures only the
kernel launches. :class:`CudaTimer` measures what the device did, in one of three
modes (:envvar:`OTEL_INFERENCE_CUDA_TIMING`):

``events`` (default)
    A CUDA event is recorded on the current stream at the start and at the end;
    the calling thread never synchronizes. A resolver thread waits (polling
    ``query()``, which never blocks a stream) until the end event has completed,
    then reports ``start.elapsed_time(end)`` as the duration and the device's end
    mapped to wall-clock time (through an anchor event timed on a private side
    stream) so the span can end where the device work really ended. Events come
    from a per-device pool; the pending queue is bounded: when it is full the
    stage falls back to host time (source ``host_fallback``) and the drop is
    counted.
``sync``
    ``torch.cuda.synchronize`` before and after: exact, but it blocks the
    pipeline and changes what it measures (no overlap of host and device work).
``off``
    Host time only (the launches, not the device work), flagged ``host_unsynced``.

CPU work (no CUDA device) is always plain wall time and never calls CUDA.

Every CUDA call goes through a backend object (:class:`TorchCudaBackend` unless
one is given), so the logic here is tested against a fake with the same
contract as ``torch.cuda.Event``/``Stream``. The backend imports torch lazily:
this module is importable without torch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from time import perf_counter_ns, time_ns
from typing import Any, Protocol

from otel_inference._fork import after_fork_in_child
from otel_inference.config import ConfigurationError
from otel_inference.stages import log_once

# --- clocks ------------------------------------------------------------------------

Clock = Callable[[], int]
monotonic_ns: Clock = perf_counter_ns  # durations
wall_ns: Clock = time_ns  # span timestamps

# --- modes and sources -------------------------------------------------------------

CUDA_TIMING_ENV = "OTEL_INFERENCE_CUDA_TIMING"
EVENTS = "events"
SYNC = "sync"
OFF = "off"
CUDA_TIMING_MODES = (EVENTS, SYNC, OFF)

# Where a stage's duration came from (span attribute ``inference.timing.source``).
SOURCE_HOST = "host"  # CPU work: wall time is the truth
SOURCE_EVENTS = "cuda_events"
SOURCE_SYNC = "cuda_sync"
SOURCE_UNSYNCED = "host_unsynced"  # mode off on a CUDA device: launches only
SOURCE_FALLBACK = "host_fallback"  # events mode could not time it on the device

# Why a stage fell back to host time in events mode.
REASON_QUEUE_FULL = "queue_full"
REASON_CUDA_ERROR = "cuda_error"
REASON_SHUTDOWN = "shutdown"

DEFAULT_MAX_PENDING = 1024
DEFAULT_POOL_SIZE = 64
_POLL_MIN_S = 0.0001
_POLL_MAX_S = 0.002
_CALIBRATE_EVERY_NS = 1_000_000_000
_CALIBRATE_SPIN_NS = 2_000_000

_logger = logging.getLogger(__name__)


def parse_cuda_timing(value: str | None, source: str = CUDA_TIMING_ENV) -> str:
    """Validate a timing mode (empty: ``events``). Raises :class:`ConfigurationError`."""
    mode = (value or "").strip().lower()
    if not mode:
        return EVENTS
    if mode not in CUDA_TIMING_MODES:
        raise ConfigurationError(
            f"{source}={value!r} is not a CUDA timing mode; expected one of: "
            f"{', '.join(CUDA_TIMING_MODES)}"
        )
    return mode


def cuda_timing_from_env(environ: Mapping[str, str] | None = None) -> str:
    """The validated :envvar:`OTEL_INFERENCE_CUDA_TIMING` mode."""
    environ = os.environ if environ is None else environ
    return parse_cuda_timing(environ.get(CUDA_TIMING_ENV))


# --- the CUDA backend ----------------------------------------------------------------


class CudaEvent(Protocol):
    """The part of ``torch.cuda.Event`` the timer uses."""

    def record(self, stream: Any = None) -> None: ...
    def query(self) -> bool: ...
    def elapsed_time(self, end_event: Any) -> float: ...


class CudaBackend(Protocol):
    def event(self) -> CudaEvent: ...
    def current_stream(self, device: int) -> Any: ...
    def new_stream(self, device: int) -> Any: ...
    def synchronize(self, device: int) -> None: ...


class TorchCudaBackend:
    """The real backend: ``torch.cuda`` (imported when first needed)."""

    def __init__(self) -> None:
        import torch

        self._cuda = torch.cuda

    def event(self) -> CudaEvent:
        return self._cuda.Event(enable_timing=True)

    def current_stream(self, device: int) -> Any:
        return self._cuda.current_stream(device)

    def new_stream(self, device: int) -> Any:
        return self._cuda.Stream(device=device)

    def synchronize(self, device: int) -> None:
        self._cuda.synchronize(device)


# --- the timer -----------------------------------------------------------------------


class Timing:
    """One timed span of work: started by :meth:`CudaTimer.begin`, ended by
    :meth:`CudaTimer.end`. ``source`` says where the duration came from;
    ``host_ns`` is the host (launch) time, set by ``end``."""

    __slots__ = (
        "device",
        "done",
        "end_event",
        "host_end_wall_ns",
        "host_ns",
        "reason",
        "source",
        "start_event",
        "start_ns",
        "stream",
    )

    def __init__(self, source: str, device: int | None, reason: str | None = None) -> None:
        self.source = source
        self.device = device
        self.reason = reason
        self.start_event: Any = None
        self.end_event: Any = None
        self.stream: Any = None
        self.host_ns = 0
        self.host_end_wall_ns = 0
        self.done: Done | None = None
        self.start_ns = 0


# done(duration_ns, end_wall_ns or None, timing): called once per Timing, on the
# calling thread (host, sync, fallback) or on the resolver thread (events).
Done = Callable[[int, "int | None", Timing], None]


class TimerStats:
    """Counts for tests and ``benchmarks/cuda_check.py``."""

    __slots__ = ("errors", "fallbacks", "queue_full", "resolved")

    def __init__(self) -> None:
        self.resolved = 0
        self.fallbacks = 0
        self.queue_full = 0
        self.errors = 0


class CudaTimer:
    """Device-aware timing for stages (see the module docstring).

    ``begin(device)`` returns a :class:`Timing`; ``device`` is a CUDA device index,
    or ``None`` for host work (CPU, meta), which is wall time and never touches
    CUDA. ``end(timing, done)`` calls ``done`` now, or later from the resolver
    thread in events mode. Thread-safe.
    """

    def __init__(
        self,
        mode: str = EVENTS,
        backend: CudaBackend | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        pool_size: int = DEFAULT_POOL_SIZE,
        monotonic: Clock = perf_counter_ns,
        wall: Clock = time_ns,
        calibrate_every_ns: int = _CALIBRATE_EVERY_NS,
    ) -> None:
        self.mode = parse_cuda_timing(mode, "mode")
        self._backend = backend
        self._max_pending = max(1, max_pending)
        self._pool_size = pool_size
        self._monotonic = monotonic
        self._wall = wall
        self._calibrate_every_ns = calibrate_every_ns
        self._pending: deque[Timing] = deque()
        self._pools: dict[int, list[Any]] = {}
        # device -> (anchor event, its wall time, monotonic time of calibration)
        self._anchors: dict[int, tuple[Any, int, int]] = {}
        self._side_streams: dict[int, Any] = {}
        self._wake = threading.Event()
        self._idle = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self.stats = TimerStats()
        _timers.add(self)

    # the hot path ------------------------------------------------------------------

    @property
    def backend(self) -> CudaBackend:
        backend = self._backend
        if backend is None:
            backend = self._backend = TorchCudaBackend()
        return backend

    @property
    def pending(self) -> int:
        return len(self._pending)

    def begin(self, device: int | None) -> Timing:
        if device is None:
            timing = Timing(SOURCE_HOST, None)
        elif self.mode == EVENTS:
            timing = self._begin_events(device)
        elif self.mode == SYNC:
            timing = Timing(SOURCE_SYNC, device)
            try:
                self.backend.synchronize(device)
            except Exception:
                self._cuda_error("synchronize")
                timing.source, timing.reason = SOURCE_FALLBACK, REASON_CUDA_ERROR
        else:
            timing = Timing(SOURCE_UNSYNCED, device)
        timing.start_ns = self._monotonic()
        return timing

    def _begin_events(self, device: int) -> Timing:
        if self._closing:
            return Timing(SOURCE_FALLBACK, device, REASON_SHUTDOWN)
        if len(self._pending) >= self._max_pending:
            # The resolver is behind (or the device is): never grow without bound.
            self.stats.queue_full += 1
            return Timing(SOURCE_FALLBACK, device, REASON_QUEUE_FULL)
        timing = Timing(SOURCE_EVENTS, device)
        try:
            stream = self.backend.current_stream(device)
            event = self._event(device)
            event.record(stream)
        except Exception:
            self._cuda_error("record")
            timing.source, timing.reason = SOURCE_FALLBACK, REASON_CUDA_ERROR
            return timing
        timing.stream = stream
        timing.start_event = event
        return timing

    def end(self, timing: Timing, done: Done) -> None:
        """:meth:`stop` then :meth:`report`."""
        self.stop(timing)
        self.report(timing, done)

    def stop(self, timing: Timing) -> None:
        """Mark the end of the work now (end event, or the closing synchronize)."""
        source = timing.source
        if source == SOURCE_EVENTS:
            try:
                event = self._event(timing.device)  # type: ignore[arg-type]
                event.record(timing.stream)
            except Exception:
                self._cuda_error("record")
                self._release(timing.device, timing.start_event)  # type: ignore[arg-type]
                timing.start_event = None
                timing.source, timing.reason = SOURCE_FALLBACK, REASON_CUDA_ERROR
            else:
                timing.end_event = event
                timing.host_end_wall_ns = self._wall()
        elif source == SOURCE_SYNC:
            try:
                self.backend.synchronize(timing.device)  # type: ignore[arg-type]
            except Exception:
                self._cuda_error("synchronize")
                timing.source, timing.reason = SOURCE_FALLBACK, REASON_CUDA_ERROR
        timing.host_ns = self._monotonic() - timing.start_ns

    def report(self, timing: Timing, done: Done) -> None:
        """Hand the duration to ``done``: now, or from the resolver thread once the
        end event has completed (events mode). Call after :meth:`stop`; work done
        in between (e.g. summarising a profile) is not timed."""
        if timing.source == SOURCE_EVENTS:
            if not self._closing:
                timing.done = done
                self._pending.append(timing)
                if self._thread is None:
                    self._start_thread()
                elif self._idle:
                    self._wake.set()
                return
            self._release(timing.device, timing.start_event)  # type: ignore[arg-type]
            self._release(timing.device, timing.end_event)  # type: ignore[arg-type]
            timing.start_event = timing.end_event = timing.stream = None
            timing.source, timing.reason = SOURCE_FALLBACK, REASON_SHUTDOWN
        if timing.source == SOURCE_FALLBACK:
            self.stats.fallbacks += 1
        _call(done, timing.host_ns, None, timing)

    # events: pool ------------------------------------------------------------------

    def _event(self, device: int) -> Any:
        pool = self._pools.get(device)
        if pool:
            try:
                return pool.pop()
            except IndexError:  # emptied by another thread meanwhile
                pass
        return self.backend.event()

    def _release(self, device: int, event: Any) -> None:
        if event is None:
            return
        pool = self._pools.get(device)
        if pool is None:
            pool = self._pools.setdefault(device, [])
        if len(pool) < self._pool_size:
            pool.append(event)

    def pooled(self, device: int) -> int:
        """Free events pooled for ``device`` (for tests)."""
        return len(self._pools.get(device, ()))

    # events: resolver ------------------------------------------------------------------

    def _start_thread(self) -> None:
        with self._thread_lock:
            if self._thread is not None:
                return
            thread = threading.Thread(
                target=_resolver_main, args=(weakref.ref(self),), name="otel-inference-cuda-timer"
            )
            thread.daemon = True
            self._thread = thread
            thread.start()

    def _step(self) -> float | None:
        """Resolve what has completed. Returns how long to sleep before polling
        again, ``None`` to wait for new work, or a negative number to stop."""
        pending = self._pending
        if not pending:
            if self._closing:
                return -1.0
            return None
        head = pending[0]
        try:
            complete = head.end_event.query()
        except Exception:
            self._cuda_error("query")
            complete = None
        if complete is False:
            return _POLL_MIN_S
        pending.popleft()
        if complete is None:
            self._fallback(head, REASON_CUDA_ERROR)
        else:
            self._resolve(head)
        return 0.0

    def _resolve(self, timing: Timing) -> None:
        device: int = timing.device  # type: ignore[assignment]
        try:
            elapsed_ms = timing.start_event.elapsed_time(timing.end_event)
            end_wall = self._end_wall(device, timing)
        except Exception:
            self._cuda_error("elapsed_time")
            self._fallback(timing, REASON_CUDA_ERROR)
            return
        self._release(device, timing.start_event)
        self._release(device, timing.end_event)
        timing.start_event = timing.end_event = timing.stream = None
        self.stats.resolved += 1
        done, timing.done = timing.done, None
        _call(done, max(0, round(elapsed_ms * 1e6)), end_wall, timing)  # type: ignore[arg-type]

    def _fallback(self, timing: Timing, reason: str) -> None:
        device: int = timing.device  # type: ignore[assignment]
        self._release(device, timing.start_event)
        self._release(device, timing.end_event)
        timing.start_event = timing.end_event = timing.stream = None
        timing.source, timing.reason = SOURCE_FALLBACK, reason
        self.stats.fallbacks += 1
        done, timing.done = timing.done, None
        _call(done, timing.host_ns, None, timing)  # type: ignore[arg-type]

    def _end_wall(self, device: int, timing: Timing) -> int | None:
        """Wall-clock time at which the device finished, via the anchor; ``None``
        when no anchor could be made (the span then ends at start + duration)."""
        anchor = self._anchor(device)
        if anchor is None:
            return None
        event, anchor_wall, _ = anchor
        end_wall = anchor_wall + round(event.elapsed_time(timing.end_event) * 1e6)
        # The device cannot finish before the host asked for the end event, nor
        # after we saw it complete: clamp calibration error and clock drift.
        return min(max(end_wall, timing.host_end_wall_ns), self._wall())

    def _anchor(self, device: int) -> tuple[Any, int, int] | None:
        anchor = self._anchors.get(device)
        now = self._monotonic()
        if anchor is not None and now - anchor[2] < self._calibrate_every_ns:
            return anchor
        fresh = self._calibrate(device, None if anchor is None else anchor[0])
        if fresh is not None:
            self._anchors[device] = fresh
            return fresh
        return anchor  # an older anchor beats none

    def _calibrate(self, device: int, event: Any) -> tuple[Any, int, int] | None:
        """Time an event on an idle private stream: it completes at once, so its
        device timestamp maps to the wall time between recording and seeing it
        complete. Spins (yielding) on ``query()``, never ``synchronize()``."""
        try:
            stream = self._side_streams.get(device)
            if stream is None:
                stream = self._side_streams[device] = self.backend.new_stream(device)
            if event is None:
                event = self.backend.event()
            before = self._wall()
            event.record(stream)
            while not event.query():
                if self._wall() - before > _CALIBRATE_SPIN_NS:
                    return None
                time.sleep(0)
            after = self._wall()
        except Exception:
            self._cuda_error("calibrate")
            return None
        return event, (before + after) // 2, self._monotonic()

    # lifecycle ---------------------------------------------------------------------

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every pending timing is resolved; True if all were."""
        deadline = time.monotonic() + timeout
        while self._pending:
            if time.monotonic() > deadline:
                return False
            self._wake.set()
            time.sleep(0.001)
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Stop taking device timings, resolve what is pending (up to ``timeout``),
        record the rest with host time, stop the resolver."""
        self._closing = True
        self.flush(timeout)
        while self._pending:
            try:
                timing = self._pending.popleft()
            except IndexError:
                break
            self._fallback(timing, REASON_SHUTDOWN)
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _after_fork_in_child(self) -> None:
        # The resolver thread does not survive fork; pending events belong to the parent.
        self._thread = None
        self._idle = False
        self._pending.clear()
        self._anchors.clear()
        self._side_streams.clear()
        self._pools.clear()
        self._wake = threading.Event()
        self._thread_lock = threading.Lock()

    def _cuda_error(self, call: str) -> None:
        self.stats.errors += 1
        log_once(
            f"cuda-timer-{call}",
            "otel-inference: CUDA %s failed; timing falls back to host time",
            call,
            level=logging.ERROR,
        )


def _call(done: Done, duration_ns: int, end_wall_ns: int | None, timing: Timing) -> None:
    try:
        done(duration_ns, end_wall_ns, timing)
    except Exception:
        log_once("cuda-timer-done", "otel-inference: failed to record a timed stage")


def _resolver_main(ref: weakref.ref[CudaTimer]) -> None:
    """The resolver thread. Holds the timer weakly between steps, so a dropped
    timer's thread ends."""
    delay = _POLL_MIN_S
    while True:
        timer = ref()
        if timer is None:
            return
        try:
            wait = timer._step()
        except Exception:  # pragma: no cover - _step guards its calls
            log_once("cuda-timer-loop", "otel-inference: CUDA timer error", level=logging.ERROR)
            wait = _POLL_MAX_S
        if wait is None:
            timer._idle = True
            wake = timer._wake
            if timer._pending or timer._closing:  # appended before _idle was seen
                timer._idle = False
                continue
            del timer
            wake.wait(0.5)
            wake.clear()
            timer = ref()
            if timer is None:
                return
            timer._idle = False
            delay = _POLL_MIN_S
            continue
        del timer
        if wait < 0:
            return
        if wait == 0:
            delay = _POLL_MIN_S
            continue
        # Back off while the device is busy: polling only costs the resolver thread.
        time.sleep(delay)
        delay = min(delay * 2, _POLL_MAX_S)


_timers: weakref.WeakSet[CudaTimer] = weakref.WeakSet()


def _reset_timers_after_fork() -> None:
    for timer in list(_timers):
        timer._after_fork_in_child()


after_fork_in_child(_reset_timers_after_fork)
