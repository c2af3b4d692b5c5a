"""The dynamic batcher: batching behaviour, errors, cancellation, shutdown, and its
telemetry (queue wait, batch span linked to members, per-member histograms, cost)."""

from __future__ import annotations

import asyncio
import gc
import math
import threading
import time

import pytest
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import StatusCode

from otel_inference import request, stage
from otel_inference.batching import AsyncBatcher, BatcherClosed, BatchResultError, ThreadBatcher
from otel_inference.stages import StageContext

FORWARD_S = 0.02


def sleepy_forward(items: list) -> list:
    time.sleep(FORWARD_S)  # like a GPU forward: the same time whatever the batch size
    return [item * 2 for item in items]


async def async_forward(items: list) -> list:
    await asyncio.sleep(FORWARD_S)
    return [item * 2 for item in items]


def buckets(telemetry, name: str) -> tuple[list[float], list[int]]:
    point = telemetry.stage_points().get(name)
    if point is None:
        return [], []
    return list(point.explicit_bounds), list(point.bucket_counts)


def quantile(after: tuple, before: tuple, q: float) -> float:
    """Upper bucket bound holding quantile ``q`` of what was recorded between snapshots."""
    bounds, counts = after
    if before[1]:
        counts = [a - b for a, b in zip(counts, before[1], strict=True)]
    target = q * sum(counts)
    running = 0
    for count, bound in zip(counts, [*bounds, math.inf], strict=True):
        running += count
        if running >= target:
            return bound
    return math.inf


def metric_sum(telemetry, name: str) -> float:
    return sum(point.sum for point in telemetry.metric_points(name))


def run_threads(target, count: int) -> None:
    """Run ``target(index)`` in ``count`` threads released at once (a burst)."""
    barrier = threading.Barrier(count)

    def run(index):
        barrier.wait()
        target(index)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# --- batching behaviour -----------------------------------------------------------------


def test_results_go_to_their_requests_in_batches(telemetry):
    sizes: list[int] = []

    def forward(items):
        sizes.append(len(items))
        time.sleep(0.005)
        return [f"out-{item}" for item in items]

    results = {}
    with ThreadBatcher(forward, max_batch_size=8, max_wait_ms=20) as batcher:
        run_threads(lambda i: results.__setitem__(i, batcher(i, timeout=10)), 40)
    assert results == {i: f"out-{i}" for i in range(40)}
    assert sum(sizes) == 40 and max(sizes) <= 8 and max(sizes) > 1


def test_burst_raises_queue_wait_while_forward_stays_flat_threads(telemetry):
    with ThreadBatcher(sleepy_forward, max_batch_size=4, max_wait_ms=1) as batcher:

        def call(index):
            with request():
                assert batcher(index, timeout=30) == index * 2

        for index in range(8):  # one at a time
            call(index)
        quiet_wait, quiet_forward = (
            buckets(telemetry, "queue_wait"),
            buckets(telemetry, "batch"),
        )
        run_threads(call, 64)  # a burst: 16 batches of 4 behind each other
    burst_wait = quantile(buckets(telemetry, "queue_wait"), quiet_wait, 0.95)
    burst_forward = quantile(buckets(telemetry, "batch"), quiet_forward, 0.95)
    calm_wait = quantile(quiet_wait, ([], []), 0.95)
    calm_forward = quantile(quiet_forward, ([], []), 0.95)
    assert burst_wait >= 5 * FORWARD_S  # many batches ahead
    assert burst_wait >= 5 * calm_wait
    assert calm_forward / 2 <= burst_forward <= calm_forward * 2
    (size,) = telemetry.metric_points("inference.batch.size")
    assert size.sum == 72


def test_burst_raises_queue_wait_while_forward_stays_flat_asyncio(telemetry):
    async def main():
        batcher = AsyncBatcher(async_forward, max_batch_size=4, max_wait_ms=1)

        async def call(index):
            with request():
                assert await batcher(index) == index * 2

        for index in range(8):
            await call(index)
        await asyncio.sleep(0)  # let the last batch's scheduled recording run
        quiet = buckets(telemetry, "queue_wait"), buckets(telemetry, "batch")
        await asyncio.gather(*(call(index) for index in range(64)))
        await batcher.aclose()
        return quiet

    quiet_wait, quiet_forward = asyncio.run(main())
    burst_wait = quantile(buckets(telemetry, "queue_wait"), quiet_wait, 0.95)
    burst_forward = quantile(buckets(telemetry, "batch"), quiet_forward, 0.95)
    calm_wait = quantile(quiet_wait, ([], []), 0.95)
    calm_forward = quantile(quiet_forward, ([], []), 0.95)
    assert burst_wait >= 5 * FORWARD_S
    assert burst_wait >= 5 * calm_wait
    assert calm_forward / 2 <= burst_forward <= calm_forward * 2


def test_zero_wait_single_producer_has_no_queue_wait(telemetry):
    with ThreadBatcher(sleepy_forward, max_batch_size=32, max_wait_ms=0) as batcher:
        for index in range(20):
            with request():
                batcher(index, timeout=10)
    waits = buckets(telemetry, "queue_wait")
    assert sum(waits[1]) == 20
    assert quantile(waits, ([], []), 0.95) <= 0.005  # generous: typically ~0.1 ms
    (fill,) = telemetry.metric_points("inference.batch.fill_ratio")
    assert fill.sum == pytest.approx(20 / 32)  # 20 batches of 1


def test_zero_wait_single_producer_asyncio(telemetry):
    async def main():
        async with AsyncBatcher(async_forward, max_batch_size=32, max_wait_ms=0) as batcher:
            for index in range(20):
                with request():
                    await batcher(index)

    asyncio.run(main())
    waits = buckets(telemetry, "queue_wait")
    assert sum(waits[1]) == 20
    assert quantile(waits, ([], []), 0.95) <= 0.005


def test_max_wait_holds_a_lone_request(telemetry):
    # The counterpart of the zero-wait test: a single producer never fills a
    # batch, so each request waits max_wait_ms, and that is formation wait.
    with ThreadBatcher(sleepy_forward, max_batch_size=32, max_wait_ms=30) as batcher:
        for index in range(3):
            with request():
                batcher(index, timeout=10)
    point = telemetry.stage_points()["queue_wait"]
    assert point.count == 3 and point.min >= 0.025
    (formation,) = telemetry.metric_points("inference.batch.formation.duration")
    assert formation.count == 3 and formation.min >= 0.02


# --- telemetry shape ----------------------------------------------------------------------


def test_one_batch_span_linked_to_every_member_and_shared_cost(telemetry):
    with ThreadBatcher(sleepy_forward, max_batch_size=4, max_wait_ms=5000, name="enc") as batcher:

        def call(index):
            with request():
                batcher(index, timeout=10)

        run_threads(call, 4)  # dispatched when the 4th arrives
    (batch,) = telemetry.spans("batch")
    requests = telemetry.spans("inference.request")
    waits = telemetry.spans("queue_wait")
    assert len(requests) == 4 and len(waits) == 4
    request_ids = {span.context.span_id for span in requests}
    assert {link.context.span_id for link in batch.links} == request_ids
    assert batch.parent.span_id in request_ids
    assert batch.attributes["inference.batch.size"] == 4
    assert batch.attributes["inference.batch.fill_ratio"] == 1.0
    assert batch.attributes["inference.batcher.name"] == "enc"
    for wait in waits:
        assert wait.parent.span_id in request_ids
        assert [link.context.span_id for link in wait.links] == [batch.context.span_id]
        assert wait.attributes["inference.batch.share"] == 0.25
        assert wait.end_time <= batch.start_time + 1_000_000  # waits end as the batch starts
    points = telemetry.stage_points()
    duration = (batch.end_time - batch.start_time) / 1e9
    # Each member experienced the whole forward; the cost is counted once in total.
    assert points["batch"].count == 4
    assert points["batch"].sum == pytest.approx(4 * duration, rel=0.01)
    assert metric_sum(telemetry, "inference.stage.cost") == pytest.approx(duration, rel=0.01)
    # queue_wait + batch cover the requests.
    assert points["unattributed"].sum < 0.5 * points["request"].sum


def test_unsampled_members_record_histograms_without_spans(unsampled_telemetry):
    tracer = unsampled_telemetry.tracer_provider.get_tracer("test")

    def forward(items):
        with stage("h2d_transfer"):
            pass
        return items

    with ThreadBatcher(forward, max_batch_size=4, max_wait_ms=1) as batcher:

        def call(index):
            with tracer.start_as_current_span("server"):
                batcher(index, timeout=10)

        run_threads(call, 8)
    assert unsampled_telemetry.spans() == []
    points = unsampled_telemetry.stage_points()
    assert points["queue_wait"].count == 8 and points["batch"].count == 8
    assert "batch/h2d_transfer" in points


def test_member_inside_a_stage_keeps_its_parent(telemetry):
    with ThreadBatcher(sleepy_forward, max_batch_size=2, max_wait_ms=0) as batcher:
        with request(), stage("handler"):
            batcher(1, timeout=10)
    points = telemetry.stage_points()
    assert {"handler/queue_wait", "handler/batch"} <= set(points)
    assert "queue_wait" not in points


def test_instrument_false_and_suppression_record_nothing(telemetry):
    with ThreadBatcher(sleepy_forward, instrument=False, max_wait_ms=0) as batcher:
        with request():
            assert batcher(1, timeout=10) == 2
    with ThreadBatcher(sleepy_forward, max_wait_ms=0) as batcher:
        with request(), suppress_instrumentation():
            assert batcher(2, timeout=10) == 4
    assert telemetry.spans("batch") == [] and telemetry.spans("queue_wait") == []
    assert set(telemetry.stage_points()) == {"request", "unattributed"}


def test_sync_fn_in_async_batcher_runs_in_executor_with_batch_context(telemetry):
    threads = set()

    def forward(items):
        threads.add(threading.get_ident())
        with stage("h2d_transfer"):
            pass
        return items

    async def main():
        async with AsyncBatcher(forward, max_batch_size=2, max_wait_ms=0) as batcher:
            with request():
                assert await batcher("x") == "x"

    asyncio.run(main())
    assert threading.get_ident() not in threads
    (batch,) = telemetry.spans("batch")
    (nested,) = telemetry.spans("h2d_transfer")
    assert nested.parent.span_id == batch.context.span_id
    assert "batch/h2d_transfer" in telemetry.stage_points()


# --- errors -----------------------------------------------------------------------------


def test_batch_error_is_delivered_to_every_member(telemetry):
    error = ValueError("bad batch")

    def forward(items):
        raise error

    with ThreadBatcher(forward, max_batch_size=4, max_wait_ms=5000) as batcher:
        futures = [batcher.submit(i) for i in range(4)]
        for future in futures:
            assert future.exception(timeout=10) is error
        # The worker keeps serving after a failed batch.
        more = [batcher.submit(i) for i in range(4)]
        assert all(future.exception(timeout=10) is error for future in more)
    (first, _) = telemetry.spans("batch")
    assert first.status.status_code is StatusCode.ERROR
    assert telemetry.stage_points()["batch!ValueError"].count == 8


def test_wrong_number_of_results(telemetry):
    with ThreadBatcher(lambda items: items[:-1], max_batch_size=2, max_wait_ms=5000) as batcher:
        futures = [batcher.submit(i) for i in range(2)]
        for future in futures:
            assert isinstance(future.exception(timeout=10), BatchResultError)


def test_batch_error_async(telemetry):
    async def forward(items):
        raise KeyError("missing")

    async def main():
        async with AsyncBatcher(forward, max_batch_size=3, max_wait_ms=5000) as batcher:
            return await asyncio.gather(*(batcher(i) for i in range(3)), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(result, KeyError) for result in results)
    assert results[0] is results[1] is results[2]
    assert telemetry.stage_points()["batch!KeyError"].count == 3


# --- cancellation and shutdown ---------------------------------------------------------


def gated_forward(gate: threading.Event, seen: list):
    def forward(items):
        seen.append(list(items))
        gate.wait(10)
        return items

    return forward


def test_cancelled_future_is_left_out_of_its_batch(telemetry):
    gate, seen = threading.Event(), []
    with ThreadBatcher(gated_forward(gate, seen), max_batch_size=8, max_wait_ms=0) as batcher:
        first = batcher.submit("first")
        while not seen:
            time.sleep(0.001)  # the worker is busy with the first batch
        waiting = [batcher.submit(name) for name in ("a", "b", "c")]
        assert waiting[1].cancel()
        gate.set()
        assert first.result(10) == "first"
        assert [waiting[0].result(10), waiting[2].result(10)] == ["a", "c"]
    assert seen == [["first"], ["a", "c"]]


def test_close_drains_or_cancels_pending(telemetry):
    gate, seen = threading.Event(), []
    batcher = ThreadBatcher(gated_forward(gate, seen), max_batch_size=2, max_wait_ms=0)
    first = batcher.submit(0)
    while not seen:
        time.sleep(0.001)
    pending = [batcher.submit(i) for i in range(1, 5)]
    threading.Timer(0.05, gate.set).start()
    batcher.close()  # waits: everything submitted is run
    assert [future.result(0) for future in [first, *pending]] == [0, 1, 2, 3, 4]
    with pytest.raises(BatcherClosed):
        batcher.submit(5)

    gate2, seen2 = threading.Event(), []
    batcher = ThreadBatcher(gated_forward(gate2, seen2), max_batch_size=2, max_wait_ms=0)
    first = batcher.submit(0)
    while not seen2:
        time.sleep(0.001)
    pending = [batcher.submit(i) for i in range(1, 5)]
    batcher.close(wait=False, cancel_pending=True)
    gate2.set()
    batcher.close()
    assert first.result(10) == 0
    assert all(future.cancelled() for future in pending)
    assert seen2 == [[0]]


def test_async_cancellation_and_shutdown(telemetry):
    async def main():
        gate = asyncio.Event()
        seen = []

        async def forward(items):
            seen.append(list(items))
            await gate.wait()
            return items

        batcher = AsyncBatcher(forward, max_batch_size=8, max_wait_ms=0)
        first = asyncio.ensure_future(batcher("first"))
        while not seen:
            await asyncio.sleep(0)
        a, b = asyncio.ensure_future(batcher("a")), asyncio.ensure_future(batcher("b"))
        await asyncio.sleep(0)
        b.cancel()  # before its batch starts: left out
        first.cancel()  # during its batch: the others are unaffected
        gate.set()
        assert await a == "a"
        assert first.cancelled() and b.cancelled()
        assert seen == [["first"], ["a"]]

        # aclose() runs what was submitted; cancel_pending=True cancels it.
        gate.clear()
        running = asyncio.ensure_future(batcher("c"))
        while len(seen) < 3:
            await asyncio.sleep(0)
        queued = asyncio.ensure_future(batcher("d"))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(batcher.aclose(cancel_pending=True))
        await asyncio.sleep(0)
        gate.set()
        await closing
        assert await running == "c"
        with pytest.raises(asyncio.CancelledError):
            await queued
        with pytest.raises(BatcherClosed):
            await batcher("e")

        # Cancelling the worker (event loop shutdown) cancels its callers.
        gate.clear()
        batcher = AsyncBatcher(forward, max_batch_size=8, max_wait_ms=0)
        stuck = asyncio.ensure_future(batcher("f"))
        while len(seen) < 4:
            await asyncio.sleep(0)
        behind = asyncio.ensure_future(batcher("g"))
        await asyncio.sleep(0)
        batcher._task.cancel()
        for caller in (stuck, behind):
            with pytest.raises(asyncio.CancelledError):
                await caller
        assert batcher.closed

    asyncio.run(main())


def test_async_batcher_is_bound_to_one_loop(telemetry):
    batcher = AsyncBatcher(async_forward, max_wait_ms=0)

    async def use():
        return await batcher(1)

    first_loop = asyncio.new_event_loop()
    try:
        assert first_loop.run_until_complete(use()) == 2
        with pytest.raises(RuntimeError, match="another event loop"):
            asyncio.run(use())
        first_loop.run_until_complete(batcher.aclose())
    finally:
        first_loop.close()
    # A loop that shuts down cancels the worker, which closes the batcher.
    batcher = AsyncBatcher(async_forward, max_wait_ms=0)
    assert asyncio.run(use()) == 2
    assert batcher.closed


def test_parameters_are_validated():
    for bad in ({"max_batch_size": 0}, {"max_wait_ms": -1}, {"max_wait_ms": math.inf}):
        with pytest.raises(ValueError):
            ThreadBatcher(sleepy_forward, **bad)
    with pytest.raises(TypeError):
        ThreadBatcher(sleepy_forward, max_batch_size=2.5)


# --- bounded bookkeeping -----------------------------------------------------------------


def test_no_leaked_bookkeeping_after_100k_items(unsampled_telemetry):
    tracer = unsampled_telemetry.tracer_provider.get_tracer("test")
    gc.collect()
    baseline = sum(1 for obj in gc.get_objects() if type(obj) is StageContext)
    start = time.perf_counter()
    with ThreadBatcher(lambda items: items, max_batch_size=1000, max_wait_ms=0) as batcher:
        with tracer.start_as_current_span("server"):
            for _ in range(10):
                futures = [batcher.submit(index) for index in range(10_000)]
                assert [future.result(30) for future in futures] == list(range(10_000))
        assert len(batcher._pending) == 0
    elapsed = time.perf_counter() - start
    del futures
    gc.collect()
    assert sum(1 for obj in gc.get_objects() if type(obj) is StageContext) == baseline
    (size,) = unsampled_telemetry.metric_points("inference.batch.size")
    assert size.sum == 100_000
    assert unsampled_telemetry.stage_points()["queue_wait"].count == 100_000
    assert elapsed < 60  # generous; typically a few seconds
