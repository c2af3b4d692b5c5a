"""A fake CUDA device honouring the contract ``otel_inference.timing`` relies on.

It behaves like ``torch.cuda.Event`` / ``Stream`` where the timer can tell:

* ``event.record(stream)`` enqueues the event behind the work already queued on
  that stream; re-recording an event re-captures it (as CUDA does).
* ``event.query()`` is True once the stream has executed up to the event, and
  for an event never recorded (like CUDA); it never blocks.
* ``start.elapsed_time(end)`` is the device time between the two events in
  milliseconds, and raises (like CUDA) unless both have completed.
* A stream runs only when the test says so (``stream.run()``), so the test
  controls completion. The private stream the timer creates for its clock anchor
  is idle and runs at once. The device clock is the fake host clock plus an
  offset, so mapping device time to wall time is checkable exactly.
* Nothing may ever block: ``event.synchronize()`` fails the test;
  ``backend.synchronize()`` (sync mode only) is counted.
"""

from __future__ import annotations

import threading
import time
from typing import Any


class FakeClock:
    """Host clock in ns that moves only when told (starts at the real wall clock)."""

    def __init__(self) -> None:
        self.now = time.time_ns()
        self._lock = threading.Lock()

    def __call__(self) -> int:
        return self.now

    def advance(self, ns: int) -> None:
        with self._lock:
            self.now += ns

    def advance_to(self, ns: int) -> None:
        with self._lock:
            self.now = max(self.now, ns)


class FakeEvent:
    def __init__(self, device: FakeDevice) -> None:
        self.device = device
        self.stamp: int | None = None  # device time at which it completed
        self.recorded = False
        self.query_threads: set[int] = set()

    def record(self, stream: FakeStream | None = None) -> None:
        stream = stream or self.device.current
        self.recorded = True
        self.stamp = None
        stream.enqueue(("event", self))

    def query(self) -> bool:
        self.query_threads.add(threading.get_ident())
        return (not self.recorded) or self.stamp is not None

    def elapsed_time(self, end: FakeEvent) -> float:
        if self.stamp is None or end.stamp is None:
            raise RuntimeError("CUDA error: device not ready")
        return (end.stamp - self.stamp) / 1e6

    def synchronize(self) -> None:
        raise AssertionError("the timer must never synchronize on an event")


class FakeStream:
    def __init__(self, device: FakeDevice, auto: bool = False) -> None:
        self.device = device
        self.auto = auto  # an idle private stream: runs what is queued at once
        self.cursor = 0  # device time at which the last queued item finished
        self.queue: list[tuple[str, Any]] = []
        self._lock = threading.Lock()

    def enqueue(self, item: tuple[str, Any]) -> None:
        with self._lock:
            self.queue.append(item)
        if self.auto:
            self.run()

    def launch(self, duration_ns: int) -> None:
        """Queue a kernel taking ``duration_ns`` of device time."""
        self.enqueue(("kernel", duration_ns))

    def run(self) -> int:
        """Execute everything queued; returns the device time at the end. The
        fake host clock moves to the end of the work (the device took that long)."""
        with self._lock:
            cursor = max(self.cursor, self.device.now())
            for kind, item in self.queue:
                if kind == "kernel":
                    cursor += item
                else:
                    item.stamp = cursor
            self.queue.clear()
            self.cursor = cursor
        self.device.clock.advance_to(cursor - self.device.offset_ns)
        return cursor


class FakeDevice:
    def __init__(self, clock: FakeClock, offset_ns: int = -3_000_000_000) -> None:
        self.clock = clock
        self.offset_ns = offset_ns  # device clock = host clock + offset
        self.current = FakeStream(self)

    def now(self) -> int:
        return self.clock() + self.offset_ns


class FakeBackend:
    """The timer's backend, on fake devices; counts what it is asked for."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.devices: dict[int, FakeDevice] = {}
        self.events_created = 0
        self.created: list[FakeEvent] = []
        self.synchronized = 0
        self.calls: list[str] = []
        self.fail: set[str] = set()  # names of calls that raise, to test fallbacks

    def device(self, index: int = 0) -> FakeDevice:
        device = self.devices.get(index)
        if device is None:
            device = self.devices[index] = FakeDevice(self.clock)
        return device

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise RuntimeError(f"CUDA error: fake {name} failure")

    def event(self) -> FakeEvent:
        self._call("event")
        self.events_created += 1
        event = _DeviceBoundEvent(self)
        self.created.append(event)
        return event

    def current_stream(self, device: int) -> FakeStream:
        self._call("current_stream")
        return self.device(device).current

    def new_stream(self, device: int) -> FakeStream:
        self._call("new_stream")
        return FakeStream(self.device(device), auto=True)

    def synchronize(self, device: int) -> None:
        self._call("synchronize")
        self.synchronized += 1
        self.device(device).current.run()


class _DeviceBoundEvent(FakeEvent):
    """An event bound to a device at its first record (like ``torch.cuda.Event``)."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.stamp = None
        self.recorded = False
        self.query_threads = set()

    def record(self, stream: FakeStream | None = None) -> None:
        if stream is None:
            stream = self.backend.device(0).current
        self.device = stream.device
        super().record(stream)
