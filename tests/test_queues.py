"""queue_wait for queue.Queue / asyncio.Queue: recorded in the producer's request,
bounded bookkeeping, unchanged queue semantics."""

from __future__ import annotations

import asyncio
import gc
import logging
import logging.handlers
import queue
import threading
import time

import pytest
from opentelemetry.instrumentation.utils import suppress_instrumentation

from otel_inference import request
from otel_inference.instrumentation.queues import (
    QueueInstrumentor,
    _tracking,
    configure_queue,
    exclude_queue,
    producer_link,
)
from otel_inference.stages import StageContext


@pytest.fixture
def instrumented(telemetry):
    instrumentor = QueueInstrumentor()
    instrumentor.instrument()
    yield telemetry
    instrumentor.uninstrument()


@pytest.fixture
def instrumented_unsampled(unsampled_telemetry):
    instrumentor = QueueInstrumentor()
    instrumentor.instrument()
    yield unsampled_telemetry
    instrumentor.uninstrument()


def records(q) -> list:
    state = q.__dict__.get(_tracking._STATE_ATTR)
    return [] if state is None else list(state.records)


def queue_wait_count(telemetry) -> int:
    point = telemetry.stage_points().get("queue_wait")
    return 0 if point is None else point.count


def live_stage_contexts() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) is StageContext)


# --- what is recorded -------------------------------------------------------------


def test_queue_wait_is_a_stage_of_the_producer_request(instrumented):
    jobs = configure_queue(queue.Queue(), name="jobs")
    jobs.put("warm")  # outside any request: not recorded
    with request():
        jobs.put({"text": "unhashable"})
        time.sleep(0.03)
        consumer = threading.Thread(target=lambda: (jobs.get(), jobs.get()))
        consumer.start()
        consumer.join()
    (request_span,) = instrumented.spans("inference.request")
    (wait,) = instrumented.spans("queue_wait")
    assert wait.parent.span_id == request_span.context.span_id
    assert wait.attributes["inference.queue.name"] == "jobs"
    assert wait.attributes["inference.queue.kind"] == "queue.Queue"
    assert wait.attributes["inference.queue.depth"] == 1  # "warm" was ahead
    assert (wait.end_time - wait.start_time) / 1e9 >= 0.03
    point = instrumented.stage_points()["queue_wait"]
    assert point.count == 1 and point.sum >= 0.03
    # The wait covered the request: not reported as unattributed.
    assert instrumented.stage_points()["unattributed"].sum < 0.02


def test_default_name_is_the_creating_module(instrumented):
    q = queue.Queue()
    with request():
        q.put(1)
    q.get()
    assert instrumented.spans("queue_wait")[0].attributes["inference.queue.name"] == __name__


def test_wait_is_put_to_get_not_the_consumer_idle_time(instrumented):
    q = queue.Queue()
    got = []
    consumer = threading.Thread(target=lambda: got.append(q.get(timeout=5)))
    consumer.start()
    time.sleep(0.05)  # the consumer blocks in get() meanwhile
    with request():
        q.put("x")
    consumer.join()
    assert got == ["x"]
    assert instrumented.stage_points()["queue_wait"].sum < 0.02


def test_consumer_span_links_to_producer(instrumented):
    q = queue.Queue()
    tracer = instrumented.tracer_provider.get_tracer("test")
    with request():
        q.put(1)
    with tracer.start_as_current_span("consumer") as consumer:
        q.get()
        link = producer_link()
    (wait,) = instrumented.spans("queue_wait")
    assert link is not None and link.context.span_id == wait.context.span_id
    assert [lk.context.span_id for lk in consumer.links] == [wait.context.span_id]


def test_unsampled_producer_records_histogram_only(instrumented_unsampled):
    q = queue.Queue()
    tracer = instrumented_unsampled.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("server"):
        q.put(1)
    q.get()
    assert instrumented_unsampled.spans() == []
    assert queue_wait_count(instrumented_unsampled) == 1
    assert producer_link() is None


def test_scope_all_records_items_outside_requests(telemetry):
    instrumentor = QueueInstrumentor()
    instrumentor.instrument(scope="all")
    try:
        q = queue.Queue()
        q.put(1)
        q.get()
        assert queue_wait_count(telemetry) == 1
    finally:
        instrumentor.uninstrument()


def test_bad_scope_is_rejected(telemetry):
    from otel_inference import ConfigurationError

    with pytest.raises(ConfigurationError):
        QueueInstrumentor().instrument(scope="everything")
    QueueInstrumentor().uninstrument()


def test_bad_scope_env_falls_back_to_requests(telemetry, monkeypatch):
    monkeypatch.setenv("OTEL_INFERENCE_QUEUES_SCOPE", "bogus")
    instrumentor = QueueInstrumentor()
    instrumentor.instrument()
    try:
        q = queue.Queue()
        q.put(1)  # outside a request
        q.get()
        assert queue_wait_count(telemetry) == 0
    finally:
        instrumentor.uninstrument()


# --- positional matching: every item is attributed to its own producer -----------------


def test_concurrent_producers_and_consumers_match_items_to_their_producer(instrumented):
    q = queue.Queue(maxsize=8)
    tracer = instrumented.tracer_provider.get_tracer("test")
    mismatches: list = []
    count_per_producer = 50

    def produce():
        for _ in range(count_per_producer):
            with tracer.start_as_current_span("producer") as span:
                q.put(span.get_span_context().trace_id)

    def consume():
        for _ in range(count_per_producer):
            trace_id = q.get(timeout=10)
            link = producer_link()
            if link is None or link.context.trace_id != trace_id:
                mismatches.append(trace_id)

    threads = [threading.Thread(target=produce) for _ in range(4)]
    threads += [threading.Thread(target=consume) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert mismatches == []
    assert len(instrumented.spans("queue_wait")) == 4 * count_per_producer
    assert records(q) == []


def test_items_removed_behind_its_back_do_not_misattribute(instrumented):
    q = queue.Queue()
    tracer = instrumented.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("stale"):
        q.put("a")
        q.put("b")
    with q.mutex:
        q.queue.clear()  # a common way to flush a queue
    with tracer.start_as_current_span("fresh") as fresh:
        q.put("c")
    assert q.get() == "c"
    assert producer_link().context.trace_id == fresh.get_span_context().trace_id
    assert records(q) == []


def test_items_put_before_instrument_and_while_suppressed(telemetry):
    q = queue.Queue()
    q.put("old")
    instrumentor = QueueInstrumentor()
    instrumentor.instrument()
    try:
        with request():
            with suppress_instrumentation():
                q.put("hidden")
            q.put("seen")
        assert [q.get(), q.get(), q.get()] == ["old", "hidden", "seen"]
        (wait,) = telemetry.spans("queue_wait")
        assert wait.attributes["inference.queue.depth"] == 2
        assert queue_wait_count(telemetry) == 1
    finally:
        instrumentor.uninstrument()


def test_reinstrumenting_discards_stale_records(telemetry):
    q = queue.Queue()
    instrumentor = QueueInstrumentor()
    instrumentor.instrument()
    with request():
        q.put("a")
    instrumentor.uninstrument()
    q.put("b")  # not tracked
    instrumentor.instrument()
    try:
        assert [q.get(), q.get()] == ["a", "b"]
        assert queue_wait_count(telemetry) == 0  # "a"'s record belonged to the old setup
    finally:
        instrumentor.uninstrument()


# --- exclusions and opt-out ---------------------------------------------------------------


def test_opt_out_and_back_in(instrumented):
    q = exclude_queue(queue.Queue())
    with request():
        q.put(1)
    q.get()
    assert queue_wait_count(instrumented) == 0 and records(q) == []
    configure_queue(q, enabled=True, name="back")
    with request():
        q.put(2)
    q.get()
    assert queue_wait_count(instrumented) == 1


def test_queues_of_opentelemetry_and_configured_modules_are_excluded(telemetry):
    instrumentor = QueueInstrumentor()
    instrumentor.instrument(excluded_modules=["vendor_sdk"])
    try:
        made = {}
        for module in ("opentelemetry.sdk.fake", "concurrent.futures.fake", "vendor_sdk.x", "app"):
            namespace = {"__name__": module, "queue": queue}
            exec("q = queue.Queue()", namespace)  # constructed "from" that module
            made[module] = namespace["q"]
        with request():
            for q in made.values():
                q.put(1)
        for q in made.values():
            q.get()
        assert queue_wait_count(telemetry) == 1
        assert telemetry.spans("queue_wait")[0].attributes["inference.queue.name"] == "app"
    finally:
        instrumentor.uninstrument()


def test_logging_queue_handler_queue_is_excluded(instrumented):
    q = queue.Queue()
    handler = logging.handlers.QueueHandler(q)
    log = logging.getLogger("test_queues.handler")
    log.addHandler(handler)
    log.propagate = False
    try:
        with request():
            log.warning("inside a request")
        assert q.get_nowait().getMessage() == "inside a request"
        assert queue_wait_count(instrumented) == 0
    finally:
        log.removeHandler(handler)


def test_non_fifo_queues_are_untouched(instrumented):
    lifo, prio = queue.LifoQueue(), queue.PriorityQueue()
    with request():
        for value in (1, 3, 2):
            lifo.put(value)
            prio.put((value, {"unorderable": value}))
    assert [lifo.get() for _ in range(3)] == [2, 3, 1]
    assert [prio.get()[0] for _ in range(3)] == [1, 2, 3]
    assert queue_wait_count(instrumented) == 0


# --- queue semantics unchanged ----------------------------------------------------


def test_blocking_timeouts_and_exceptions_unchanged(instrumented):
    q = queue.Queue(maxsize=1)
    with request():
        q.put("a")
        with pytest.raises(queue.Full):
            q.put("b", timeout=0.01)
        with pytest.raises(queue.Full):
            q.put_nowait("b")
    assert q.get_nowait() == "a"
    with pytest.raises(queue.Empty):
        q.get(timeout=0.01)
    with pytest.raises(queue.Empty):
        q.get_nowait()
    # A blocked put completes when a consumer makes room.
    with request():
        q.put(1)
        threading.Timer(0.02, q.get).start()
        q.put(2, timeout=5)
    assert q.get() == 2
    assert queue_wait_count(instrumented) == 3
    assert records(q) == []


def test_task_done_and_join(instrumented):
    q = queue.Queue()
    with request():
        for index in range(5):
            q.put(index)

    def worker():
        while True:
            q.get()
            q.task_done()

    threading.Thread(target=worker, daemon=True).start()
    q.join()
    assert q.unfinished_tasks == 0
    with pytest.raises(ValueError):
        q.task_done()
    assert records(q) == []


def test_subclass_exception_propagates_unchanged(instrumented):
    class Refusing(queue.Queue):
        def _put(self, item):
            if item is None:
                raise LookupError("no None")
            super()._put(item)

    q = Refusing()
    with request():
        with pytest.raises(LookupError, match="no None"):
            q.put(None)
        q.put("ok")
    assert q.get() == "ok"
    assert queue_wait_count(instrumented) == 1


def test_uninstrument_restores_originals(telemetry):
    originals = {name: queue.Queue.__dict__[name] for name in ("__init__", "_put", "_get", "get")}
    async_originals = {
        name: asyncio.Queue.__dict__[name] for name in ("__init__", "_put", "_get", "get_nowait")
    }
    instrumentor = QueueInstrumentor()
    instrumentor.instrument()
    assert queue.Queue.__dict__["_put"] is not originals["_put"]
    instrumentor.uninstrument()
    assert {name: queue.Queue.__dict__[name] for name in originals} == originals
    assert {name: asyncio.Queue.__dict__[name] for name in async_originals} == async_originals


# --- asyncio ----------------------------------------------------------------------


def test_asyncio_queue(instrumented):
    async def main():
        q = configure_queue(asyncio.Queue(maxsize=2), name="aq")

        async def producer(index):
            with request():
                await q.put(index)
                await asyncio.sleep(0.05)  # the request stays open while consumed

        async def consumer():
            got = []
            for _ in range(4):
                got.append(await q.get())
                q.task_done()
            return got

        consuming = asyncio.ensure_future(consumer())
        await asyncio.gather(*(producer(i) for i in range(4)))
        got = await consuming
        await asyncio.wait_for(q.join(), 1)
        q.put_nowait("x")
        q.put_nowait("y")
        with pytest.raises(asyncio.QueueFull):
            q.put_nowait("z")
        assert [q.get_nowait(), q.get_nowait()] == ["x", "y"]
        with pytest.raises(asyncio.QueueEmpty):
            q.get_nowait()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(q.get(), 0.01)
        return got, q

    got, q = asyncio.run(main())
    assert got == [0, 1, 2, 3]
    waits = instrumented.spans("queue_wait")
    requests = {span.context.trace_id: span for span in instrumented.spans("inference.request")}
    assert len(waits) == 4
    for wait in waits:
        assert wait.attributes["inference.queue.kind"] == "asyncio.Queue"
        assert wait.attributes["inference.queue.name"] == "aq"
        assert wait.parent.span_id == requests[wait.context.trace_id].context.span_id
    assert records(q) == []


def test_asyncio_task_attribution(instrumented):
    async def main():
        q = asyncio.Queue()
        tracer = instrumented.tracer_provider.get_tracer("test")
        mismatches = []

        async def produce():
            for _ in range(20):
                with tracer.start_as_current_span("producer") as span:
                    await q.put(span.get_span_context().trace_id)
                await asyncio.sleep(0)

        async def consume():
            for _ in range(30):
                trace_id = await q.get()
                link = producer_link()
                if link is None or link.context.trace_id != trace_id:
                    mismatches.append(trace_id)

        await asyncio.gather(produce(), produce(), produce(), consume(), consume())
        return mismatches

    assert asyncio.run(main()) == []


# --- bounded bookkeeping --------------------------------------------------------------


class Slotted:
    __slots__ = ("value",)  # not weak-referenceable, not hashable-by-value

    def __init__(self, value):
        self.value = value


def test_no_leaked_bookkeeping_after_100k_items(instrumented_unsampled):
    tracer = instrumented_unsampled.tracer_provider.get_tracer("test")
    q = queue.Queue(maxsize=1000)
    baseline = live_stage_contexts()
    # Unhashable, non-weakref-able, and None items.
    kinds = (lambda i: [i], lambda i: {"k": i}, int, lambda i: (i,), Slotted, lambda i: None)
    start = time.perf_counter()
    with tracer.start_as_current_span("server"):  # valid (unsampled) request context
        for index in range(100_000):
            q.put(kinds[index % len(kinds)](index))
            if index % 1000 == 999:
                while not q.empty():
                    q.get_nowait()
    elapsed = time.perf_counter() - start
    assert q.empty() and records(q) == []
    assert _tracking._pending.value is None
    assert queue_wait_count(instrumented_unsampled) == 100_000
    assert live_stage_contexts() == baseline
    assert elapsed < 30  # a generous bound; typically a couple of seconds


def test_never_consumed_items_are_bounded_and_die_with_the_queue(instrumented_unsampled):
    tracer = instrumented_unsampled.tracer_provider.get_tracer("test")
    baseline = live_stage_contexts()
    q = queue.Queue()
    with tracer.start_as_current_span("server"):
        for index in range(_tracking._MAX_TRACKED + 500):
            q.put(index)
    held = records(q)
    assert len(held) == q.qsize()  # one pointer per item, no more
    assert sum(record is not None for record in held) == _tracking._MAX_TRACKED
    assert live_stage_contexts() - baseline <= _tracking._MAX_TRACKED
    del q, held
    assert live_stage_contexts() == baseline


def test_environment_variables(telemetry, monkeypatch):
    monkeypatch.setenv("OTEL_INFERENCE_QUEUES_SCOPE", "all")
    monkeypatch.setenv("OTEL_INFERENCE_QUEUES_EXCLUDED_MODULES", " vendor_sdk , other ")
    instrumentor = QueueInstrumentor()
    instrumentor.instrument()
    try:
        namespace = {"__name__": "vendor_sdk.inner", "queue": queue}
        exec("q = queue.Queue()", namespace)
        excluded, q = namespace["q"], queue.Queue()
        for each in (excluded, q):
            each.put(1)  # outside any request: recorded under scope=all
            each.get()
        assert queue_wait_count(telemetry) == 1
    finally:
        instrumentor.uninstrument()
