"""The CUDA sync-aware timer (otel_inference.timing) against a fake CUDA device.

The fake (tests/fake_cuda.py) honours the torch.cuda.Event contract the timer
relies on, with completion under the test's control, so the events logic
(resolver thread, end time, pooling, bounded queue, fallbacks, modes) is tested
here without a GPU. benchmarks/cuda_check.py checks the same paths on real CUDA.
"""

from __future__ import annotations

import logging
import threading

import pytest

from otel_inference import ConfigurationError, semconv
from otel_inference.stages import get_recorder
from otel_inference.timing import (
    EVENTS,
    OFF,
    REASON_CUDA_ERROR,
    REASON_QUEUE_FULL,
    REASON_SHUTDOWN,
    SOURCE_EVENTS,
    SOURCE_FALLBACK,
    SOURCE_HOST,
    SOURCE_SYNC,
    SOURCE_UNSYNCED,
    SYNC,
    CudaTimer,
    Timing,
    cuda_timing_from_env,
    parse_cuda_timing,
)
from tests.fake_cuda import FakeBackend, FakeClock

MS = 1_000_000
US = 1_000


class Done:
    """Collects ``done(duration_ns, end_wall_ns, timing)`` calls and their threads."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int | None, Timing]] = []
        self.threads: list[int] = []
        self.event = threading.Event()

    def __call__(self, duration_ns: int, end_wall_ns: int | None, timing: Timing) -> None:
        self.calls.append((duration_ns, end_wall_ns, timing))
        self.threads.append(threading.get_ident())
        self.event.set()


class Forbidden:
    """A backend that fails the test if the timer touches CUDA at all."""

    def __getattr__(self, name: str):
        raise AssertionError(f"CUDA backend used on a host path: {name}")


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend(FakeClock())


def make_timer(fake: FakeBackend, mode: str = EVENTS, **kwargs) -> CudaTimer:
    return CudaTimer(mode, backend=fake, monotonic=fake.clock, wall=fake.clock, **kwargs)


def run_forward(timer: CudaTimer, fake: FakeBackend, done: Done, kernel_ns: int = 5 * MS):
    """begin, launch a kernel, 100 us of host launch time, end."""
    timing = timer.begin(0)
    fake.device(0).current.launch(kernel_ns)
    fake.clock.advance(100 * US)
    timer.end(timing, done)
    return timing


# --- configuration ---------------------------------------------------------------


def test_mode_parsing_names_the_variable():
    assert parse_cuda_timing("") == EVENTS
    assert parse_cuda_timing(" SYNC ") == SYNC
    assert cuda_timing_from_env({"OTEL_INFERENCE_CUDA_TIMING": "off"}) == OFF
    with pytest.raises(ConfigurationError, match="OTEL_INFERENCE_CUDA_TIMING='eventz'"):
        cuda_timing_from_env({"OTEL_INFERENCE_CUDA_TIMING": "eventz"})


def test_env_constant_matches_the_torch_environment_variables_module():
    from otel_inference import timing
    from otel_inference.instrumentation.torch import environment_variables

    assert timing.CUDA_TIMING_ENV == environment_variables.OTEL_INFERENCE_CUDA_TIMING


# --- host paths never touch CUDA ------------------------------------------------


@pytest.mark.parametrize("mode", [EVENTS, SYNC, OFF])
def test_host_work_never_touches_cuda(mode):
    timer = CudaTimer(mode, backend=Forbidden())
    done = Done()
    timing = timer.begin(None)
    timer.end(timing, done)
    ((duration, end_wall, reported),) = done.calls
    assert reported.source == SOURCE_HOST and end_wall is None and duration >= 0
    assert done.threads == [threading.get_ident()]
    assert timer._thread is None  # no resolver thread for host work


def test_off_mode_times_launches_only_and_flags_it():
    timer = CudaTimer(OFF, backend=Forbidden())
    done = Done()
    timer.end(timer.begin(0), done)
    assert done.calls[0][2].source == SOURCE_UNSYNCED


# --- events mode ----------------------------------------------------------------


def test_events_resolved_off_the_calling_thread_with_device_duration_and_end(fake):
    timer = make_timer(fake)
    done = Done()
    timing = run_forward(timer, fake, done)
    # Not complete on the device: nothing reported, nothing blocked.
    assert not done.calls
    assert timer.flush(timeout=0.05) is False
    assert not done.calls and timer.pending == 1

    device_end = fake.device(0).current.run()
    assert timer.flush(timeout=10)
    ((duration, end_wall, reported),) = done.calls
    assert reported is timing and reported.source == SOURCE_EVENTS
    assert duration == 5 * MS  # the device time, not the 100 us of launches
    assert reported.host_ns == 100 * US  # host launch time kept
    assert end_wall == device_end - fake.device(0).offset_ns  # the device's true end
    assert done.threads[0] != threading.get_ident()
    # The calling thread never polled or synchronized an event.
    for event in fake.created:
        assert threading.get_ident() not in event.query_threads
    assert fake.synchronized == 0 and "synchronize" not in fake.calls
    timer.close()


def test_events_end_time_reaches_the_span_and_histogram_gets_device_time(fake, telemetry):
    timer = make_timer(fake)
    recorder = get_recorder()
    scope = recorder.start(semconv.MODEL_FORWARD)
    timing = timer.begin(0)
    fake.device(0).current.launch(7 * MS)
    fake.clock.advance(50 * US)
    timer.stop(timing)
    scope.exit_context()

    def done(duration_ns, end_wall_ns, reported):
        scope.record(duration_ns, end_time_ns=end_wall_ns, **{"inference.timing.source": "x"})

    timer.report(timing, done)
    device_end = fake.device(0).current.run()
    assert timer.flush(timeout=10)
    (span,) = telemetry.spans(semconv.MODEL_FORWARD)
    assert span.end_time == device_end - fake.device(0).offset_ns
    point = telemetry.stage_points()[semconv.MODEL_FORWARD]
    assert point.count == 1 and point.sum == pytest.approx(0.007)
    timer.close()


def test_events_are_pooled_and_the_pool_is_bounded(fake):
    timer = make_timer(fake, pool_size=4)
    done = Done()
    for _ in range(10):
        run_forward(timer, fake, done)
        fake.device(0).current.run()
        assert timer.flush(timeout=10)
    assert len(done.calls) == 10
    # Two events per forward, reused; plus the clock anchor's one.
    assert fake.events_created == 3
    assert timer.pooled(0) == 2

    # Many in flight at once: more events, but the pool keeps at most pool_size.
    for _ in range(6):
        run_forward(timer, fake, done)
    fake.device(0).current.run()
    assert timer.flush(timeout=10)
    assert timer.pooled(0) == 4
    timer.close()


def test_queue_full_falls_back_to_host_time_and_counts_the_drop(fake):
    timer = make_timer(fake, max_pending=2)
    done = Done()
    run_forward(timer, fake, done)
    run_forward(timer, fake, done)
    calls_before = len(fake.calls)
    third = run_forward(timer, fake, done)
    # The third was not device-timed: no CUDA call at all, reported at once with host time.
    assert len(fake.calls) == calls_before
    assert third.source == SOURCE_FALLBACK and third.reason == REASON_QUEUE_FULL
    assert done.calls[0] == (100 * US, None, third)
    assert timer.stats.queue_full == 1 and timer.stats.fallbacks == 1
    fake.device(0).current.run()
    assert timer.flush(timeout=10)
    assert [call[2].source for call in done.calls[1:]] == [SOURCE_EVENTS, SOURCE_EVENTS]
    timer.close()


def test_cuda_error_falls_back_and_logs_once(fake, caplog):
    timer = make_timer(fake)
    fake.fail.add("current_stream")
    done = Done()
    with caplog.at_level(logging.ERROR, logger="otel_inference.stages"):
        run_forward(timer, fake, done)
        run_forward(timer, fake, done)
    assert [call[2].reason for call in done.calls] == [REASON_CUDA_ERROR] * 2
    assert all(call[0] == 100 * US for call in done.calls)
    assert timer.stats.errors == 2
    timer.close()


def test_anchor_failure_leaves_end_time_to_the_stage(fake):
    timer = make_timer(fake)
    fake.fail.add("new_stream")
    done = Done()
    run_forward(timer, fake, done)
    fake.device(0).current.run()
    assert timer.flush(timeout=10)
    ((duration, end_wall, reported),) = done.calls
    assert duration == 5 * MS and end_wall is None and reported.source == SOURCE_EVENTS
    timer.close()


def test_close_records_unresolved_work_with_host_time(fake):
    timer = make_timer(fake)
    done = Done()
    run_forward(timer, fake, done)
    timer.close(timeout=0.05)  # the device never finishes
    ((duration, end_wall, reported),) = done.calls
    assert reported.source == SOURCE_FALLBACK and reported.reason == REASON_SHUTDOWN
    assert duration == 100 * US and end_wall is None
    assert timer._thread is not None and not timer._thread.is_alive()
    # After close: host time, no new device timing.
    later = Done()
    run_forward(timer, fake, later)
    assert later.calls[0][2].reason == REASON_SHUTDOWN


def test_resolver_thread_goes_idle_and_wakes_for_new_work(fake):
    timer = make_timer(fake)
    done = Done()
    run_forward(timer, fake, done)
    fake.device(0).current.run()
    assert timer.flush(timeout=10)
    thread = timer._thread
    assert done.event.wait(10)
    # Let it park, then give it more work: the same thread resolves it.
    for _ in range(200):
        if timer._idle:
            break
        threading.Event().wait(0.005)
    run_forward(timer, fake, done)
    fake.device(0).current.run()
    assert timer.flush(timeout=10)
    assert len(done.calls) == 2 and timer._thread is thread
    timer.close()


# --- sync mode -----------------------------------------------------------------------


def test_sync_mode_synchronizes_before_and_after(fake):
    timer = make_timer(fake, SYNC)
    done = Done()
    timing = timer.begin(0)
    assert fake.synchronized == 1
    fake.device(0).current.launch(3 * MS)
    timer.end(timing, done)
    assert fake.synchronized == 2
    ((duration, end_wall, reported),) = done.calls
    # The closing synchronize waited for the kernel: host time now covers it.
    assert reported.source == SOURCE_SYNC and duration == 3 * MS and end_wall is None
    assert done.threads == [threading.get_ident()]
    assert "event" not in fake.calls


# --- the fake's contract is torch's ---------------------------------------------------

# How the timer calls the CUDA API: (torch callable, fake callable, arguments).
_EVENT = object()  # stands for an event argument
_STREAM = object()  # stands for a stream argument


def _calls_the_timer_makes():
    torch = pytest.importorskip("torch")
    from tests.fake_cuda import FakeEvent

    backend = FakeBackend()
    return [
        (
            "Event(enable_timing=True)",
            torch.cuda.Event.__new__,
            None,
            (torch.cuda.Event,),
            {"enable_timing": True},
        ),
        ("Event.record(stream)", torch.cuda.Event.record, FakeEvent.record, (_EVENT, _STREAM), {}),
        ("Event.query()", torch.cuda.Event.query, FakeEvent.query, (_EVENT,), {}),
        (
            "Event.elapsed_time(end)",
            torch.cuda.Event.elapsed_time,
            FakeEvent.elapsed_time,
            (_EVENT, _EVENT),
            {},
        ),
        ("current_stream(device)", torch.cuda.current_stream, backend.current_stream, (0,), {}),
        (
            "Stream(device=device)",
            torch.cuda.Stream.__new__,
            None,
            (torch.cuda.Stream,),
            {"device": 0},
        ),
        ("synchronize(device)", torch.cuda.synchronize, backend.synchronize, (0,), {}),
    ]


def test_the_fake_and_the_timer_use_torch_cuda_signatures():
    """The timer's calls bind to the real ``torch.cuda`` signatures, and the fake
    accepts the same calls: a renamed or reshaped torch API fails here, without a GPU."""
    import inspect

    from otel_inference.timing import TorchCudaBackend

    for what, real, fake, args, kwargs in _calls_the_timer_makes():
        for side, function in (("torch", real), ("fake", fake)):
            if function is None:
                continue
            try:
                inspect.signature(function).bind(*args, **kwargs)
            except TypeError as exc:
                pytest.fail(f"{side} does not accept the timer's {what}: {exc}")
    # TorchCudaBackend is the only place those calls are spelled out.
    source = inspect.getsource(TorchCudaBackend)
    for spelled in (
        "Event(enable_timing=True)",
        "current_stream(device)",
        "Stream(device=device)",
        "synchronize(device)",
    ):
        assert spelled in source, spelled
