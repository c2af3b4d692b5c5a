"""A small dynamic batcher, fully instrumented: queue wait, batch size, fill ratio,
formation wait, and the batch's work recorded once as a span and per request as
histograms, with cost attribution that does not double count.

Requests are grouped into batches of at most ``max_batch_size``; a batch is
dispatched when full, or ``max_wait_ms`` after its oldest request arrived
(``0``: dispatch whatever is waiting as soon as the worker is free). One worker
runs one batch at a time, ``fn(items) -> results`` (one result per item, in
order). An exception raised by ``fn`` is delivered to every member.

Threads::

    from otel_inference.batching import ThreadBatcher

    def forward(texts: list[str]) -> list[list[float]]:
        return model.encode(texts)                 # one call for the whole batch

    batcher = ThreadBatcher(forward, max_batch_size=32, max_wait_ms=5)
    vector = batcher(text)                         # blocks; or batcher.submit(text) -> Future
    batcher.close()                                # drains what was submitted

asyncio (``fn`` may be ``async def``; a plain function runs in an executor)::

    from otel_inference.batching import AsyncBatcher

    batcher = AsyncBatcher(forward, max_batch_size=32, max_wait_ms=5)
    vector = await batcher(text)
    await batcher.aclose()

What is recorded (``instrument=False`` records nothing; see docs/batching-and-queues.md):

* ``queue_wait`` for each request, from submit until its batch starts, in the
  submitter's request (span when that request is sampled, linked to the batch span).
* the batch's work as stage ``stage`` (default ``batch``, named apart from the
  stages nested in it: ``tokenize``, ``model_forward``...): ONE span, linked
  to every member request; each member's ``inference.stage.duration`` histogram
  gets the whole duration (what it experienced) and ``inference.stage.cost`` gets
  ``duration / batch size`` (its share: sums to real time, no double counting).
* ``inference.batch.size``, ``inference.batch.fill_ratio`` (size / max_batch_size)
  and ``inference.batch.formation.duration`` (how long the batch was held open to
  fill), per batch, with ``inference.stage`` and ``inference.batcher.name``.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import math
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any, Generic, TypeVar

from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.metrics import Histogram, Meter
from opentelemetry.trace import Link

from otel_inference import semconv
from otel_inference.metrics import DEFAULT_DURATION_BOUNDARIES
from otel_inference.stages import (
    BatchStageScope,
    StageContext,
    StageRecorder,
    get_recorder,
    log_once,
)

__all__ = ["AsyncBatcher", "BatchResultError", "BatcherClosed", "ThreadBatcher"]

I = TypeVar("I")  # noqa: E741 - item
O = TypeVar("O")  # noqa: E741 - result

_BATCH_SIZE_BOUNDARIES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_FILL_RATIO_BOUNDARIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class BatcherClosed(RuntimeError):
    """The batcher was closed: no new submissions (or its worker stopped)."""


class BatchResultError(ValueError):
    """The batch function returned a number of results other than the number of items."""


@dataclass(frozen=True)
class _BatchInstruments:
    size: Histogram
    fill_ratio: Histogram
    formation: Histogram


def _batch_instruments(meter: Meter) -> _BatchInstruments:
    return _BatchInstruments(
        size=meter.create_histogram(
            semconv.BATCH_SIZE,
            unit="{request}",
            description="Requests per executed batch",
            explicit_bucket_boundaries_advisory=_BATCH_SIZE_BOUNDARIES,
        ),
        fill_ratio=meter.create_histogram(
            semconv.BATCH_FILL_RATIO,
            unit="1",
            description="Batch size / max_batch_size per executed batch",
            explicit_bucket_boundaries_advisory=_FILL_RATIO_BOUNDARIES,
        ),
        formation=meter.create_histogram(
            semconv.BATCH_FORMATION_DURATION,
            unit="s",
            description="Time a batch was held open waiting for more requests",
            explicit_bucket_boundaries_advisory=DEFAULT_DURATION_BOUNDARIES,
        ),
    )


class _Member:
    __slots__ = ("context", "future", "item", "submit_ns")

    def __init__(self, item: Any, future: Any, context: StageContext | None) -> None:
        self.item = item
        self.future = future
        self.context = context
        self.submit_ns = perf_counter_ns()


class _Telemetry:
    """Everything the batcher records; every method is safe to call and never raises."""

    def __init__(
        self,
        recorder: StageRecorder,
        name: str,
        stage: str,
        max_batch_size: int,
        enabled: bool,
    ) -> None:
        self.recorder = recorder
        self.name = name
        self.stage = stage
        self.max_batch_size = max_batch_size
        self.enabled = enabled
        self.metric_attributes = {
            semconv.INFERENCE_STAGE: stage,
            semconv.INFERENCE_BATCHER_NAME: name,
        }

    def capture(self) -> StageContext | None:
        if not self.enabled or not is_instrumentation_enabled():
            return None
        try:
            return self.recorder.capture()
        except Exception:
            log_once("batch-capture", "otel-inference: batcher failed to capture context")
            return None

    def open(
        self, members: Sequence[_Member], formation_start_ns: int, dispatch_ns: int
    ) -> BatchStageScope | None:
        """Open the batch stage (current in this thread/task while ``fn`` runs)."""
        if not self.enabled:
            return None
        contexts = [member.context for member in members]
        if all(context is None for context in contexts):
            return None
        size = len(members)
        return self.recorder.start_batch(
            self.stage,
            contexts,
            {
                semconv.INFERENCE_BATCHER_NAME: self.name,
                semconv.INFERENCE_BATCH_MAX_SIZE: self.max_batch_size,
                semconv.BATCH_FILL_RATIO: size / self.max_batch_size,
                semconv.BATCH_FORMATION_DURATION: (dispatch_ns - formation_start_ns) / 1e9,
            },
        )

    @staticmethod
    def cover(scope: BatchStageScope, members: Sequence[_Member], end_ns: int) -> None:
        """Before results are delivered: leave the batch context and cover each
        member's request from submit to the batch's end (cheap list appends), so
        a request that ends as soon as it has its result has no false
        ``unattributed`` time. The costlier recording comes after delivery."""
        scope.exit_context()
        for member in members:
            if member.context is not None:
                member.context.cover(member.submit_ns, end_ns)

    def record(
        self,
        scope: BatchStageScope,
        members: Sequence[_Member],
        formation_start_ns: int,
        dispatch_ns: int,
        end_ns: int,
        error: BaseException | None,
    ) -> None:
        try:
            recorder = self.recorder
            start_ns = scope.start_ns
            size = len(members)
            batch_span = scope.span_context
            links = None if batch_span is None else [Link(batch_span)]
            for member in members:
                context = member.context
                if context is None:
                    continue
                attributes = None
                if context.recording:
                    attributes = {
                        semconv.INFERENCE_BATCHER_NAME: self.name,
                        semconv.INFERENCE_BATCH_SIZE: size,
                        semconv.INFERENCE_BATCH_SHARE: 1 / size,
                    }
                recorder.record_interval(
                    semconv.QUEUE_WAIT,
                    member.submit_ns,
                    start_ns,
                    context=context,
                    attributes=attributes,
                    links=links if context.recording else None,
                    cover=False,
                )
            scope.record(end_ns - start_ns, error, cover=False)
            instruments = recorder.instruments(_batch_instruments)
            attributes = self.metric_attributes
            instruments.size.record(size, attributes)
            instruments.fill_ratio.record(size / self.max_batch_size, attributes)
            instruments.formation.record((dispatch_ns - formation_start_ns) / 1e9, attributes)
        except Exception:
            log_once(
                "batch-record", "otel-inference: batcher failed to record", level=logging.ERROR
            )


def _check_results(results: Iterable[Any], size: int) -> Sequence[Any]:
    if not isinstance(results, Sequence):
        results = list(results)
    if len(results) != size:
        raise BatchResultError(f"batch function returned {len(results)} results for {size} items")
    return results


class _BatcherBase:
    def __init__(
        self,
        fn: Callable[..., Any],
        max_batch_size: int,
        max_wait_ms: float,
        name: str,
        stage: str,
        instrument: bool,
        recorder: StageRecorder | None,
    ) -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
            raise TypeError(f"max_batch_size must be an int, not {type(max_batch_size).__name__}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, not {max_batch_size}")
        if not (isinstance(max_wait_ms, int | float) and math.isfinite(max_wait_ms)):
            raise ValueError(f"max_wait_ms must be a finite number, not {max_wait_ms!r}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, not {max_wait_ms}")
        self._fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_ms = float(max_wait_ms)
        self.name = name
        self.stage = stage
        self._max_wait_ns = int(max_wait_ms * 1_000_000)
        self._pending: deque[_Member] = deque()
        self._closed = False
        self._telemetry = _Telemetry(
            recorder or get_recorder(), name, stage, max_batch_size, instrument
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def _take(self) -> list[_Member]:
        pending = self._pending
        return [pending.popleft() for _ in range(min(len(pending), self.max_batch_size))]


class ThreadBatcher(_BatcherBase, Generic[I, O]):
    """Dynamic batching for threaded servers: one worker thread runs ``fn``.

    ``submit(item)`` returns a :class:`concurrent.futures.Future`; calling the
    batcher blocks for the result. A future cancelled before its batch starts is
    left out of the batch. ``close()`` stops submissions and, by default, runs
    what was submitted; ``close(cancel_pending=True)`` cancels it instead.
    """

    def __init__(
        self,
        fn: Callable[[list[I]], Iterable[O]],
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        name: str = "batcher",
        stage: str = semconv.BATCH,
        instrument: bool = True,
        recorder: StageRecorder | None = None,
    ) -> None:
        super().__init__(fn, max_batch_size, max_wait_ms, name, stage, instrument, recorder)
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None

    def submit(self, item: I) -> Future[O]:
        member = _Member(item, Future(), self._telemetry.capture())
        with self._cond:
            if self._closed:
                raise BatcherClosed(f"batcher {self.name!r} is closed")
            if self._thread is None:
                # Started lazily: a batcher made before a fork starts in the child.
                self._thread = threading.Thread(
                    target=self._run, name=f"otel-inference-batcher-{self.name}", daemon=True
                )
                self._thread.start()
            pending = self._pending
            pending.append(member)
            # Wake the worker when it waits for a first item or for a full batch.
            if len(pending) == 1 or len(pending) >= self.max_batch_size:
                self._cond.notify()
        return member.future

    def __call__(self, item: I, timeout: float | None = None) -> O:
        return self.submit(item).result(timeout)

    def close(
        self, wait: bool = True, cancel_pending: bool = False, timeout: float | None = None
    ) -> None:
        with self._cond:
            self._closed = True
            dropped = list(self._pending) if cancel_pending else []
            if cancel_pending:
                self._pending.clear()
            self._cond.notify_all()
            thread = self._thread
        for member in dropped:
            member.future.cancel()
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> ThreadBatcher[I, O]:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _run(self) -> None:
        cond = self._cond
        pending = self._pending
        while True:
            with cond:
                idle_since_ns = perf_counter_ns()
                while not pending and not self._closed:
                    cond.wait()
                if not pending:
                    return  # closed and drained
                # The batch opened when its first member arrived, or when the worker
                # became free if that was later; not when this thread got to run.
                formation_start_ns = max(pending[0].submit_ns, idle_since_ns)
                if self._max_wait_ns and not self._closed:
                    deadline = pending[0].submit_ns + self._max_wait_ns
                    while len(pending) < self.max_batch_size and not self._closed:
                        timeout = (deadline - perf_counter_ns()) / 1e9
                        if timeout <= 0 or not pending:
                            break
                        cond.wait(timeout)
                batch = self._take()
            try:
                error = self._execute(batch, formation_start_ns)
            except Exception:  # e.g. a future resolved by someone else: keep serving
                log_once("batcher-worker", "otel-inference: batcher failed to deliver a batch")
                continue
            if error is not None and not isinstance(error, Exception):
                self._stop(error)  # SystemExit & co. end the worker
                return

    def _execute(self, batch: list[_Member], formation_start_ns: int) -> BaseException | None:
        members = [m for m in batch if m.future.set_running_or_notify_cancel()]
        if not members:
            return None
        telemetry = self._telemetry
        dispatch_ns = perf_counter_ns()
        scope = telemetry.open(members, formation_start_ns, dispatch_ns)
        error: BaseException | None = None
        results: Sequence[Any] = ()
        try:
            results = _check_results(self._fn([m.item for m in members]), len(members))
        except BaseException as exc:  # delivered to every member, unchanged
            error = exc
        end_ns = perf_counter_ns()
        if scope is not None:
            telemetry.cover(scope, members, end_ns)
        if error is None:
            for member, result in zip(members, results, strict=True):
                member.future.set_result(result)
        else:
            for member in members:
                member.future.set_exception(error)
        if scope is not None:
            telemetry.record(scope, members, formation_start_ns, dispatch_ns, end_ns, error)
        return error

    def _stop(self, error: BaseException) -> None:
        with self._cond:
            self._closed = True
            dropped = list(self._pending)
            self._pending.clear()
        for member in dropped:
            if member.future.set_running_or_notify_cancel():
                member.future.set_exception(BatcherClosed(f"batcher worker stopped: {error!r}"))


class AsyncBatcher(_BatcherBase, Generic[I, O]):
    """Dynamic batching for asyncio: one worker task per batcher (bound to the
    event loop of its first use) awaits ``fn`` (``async def``), or runs a plain
    function in ``executor`` (default: the loop's) so the loop keeps serving.

    A caller cancelled before its batch starts is left out of the batch; one
    cancelled later just does not get its result. ``aclose()`` stops submissions
    and runs what was submitted (``cancel_pending=True`` cancels it instead);
    when the worker task is cancelled (event loop shutdown) the running and
    pending callers are cancelled.
    """

    def __init__(
        self,
        fn: Callable[[list[I]], Awaitable[Iterable[O]] | Iterable[O]],
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        name: str = "batcher",
        stage: str = semconv.BATCH,
        instrument: bool = True,
        recorder: StageRecorder | None = None,
        executor: Executor | None = None,
    ) -> None:
        super().__init__(fn, max_batch_size, max_wait_ms, name, stage, instrument, recorder)
        self._is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
        )
        self._executor = executor
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def submit(self, item: I) -> asyncio.Future[O]:
        """Queue ``item``; await the returned future for its result."""
        loop = asyncio.get_running_loop()
        if self._closed:
            raise BatcherClosed(f"batcher {self.name!r} is closed")
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(f"batcher {self.name!r} is bound to another event loop")
        member = _Member(item, loop.create_future(), self._telemetry.capture())
        if self._task is None:
            # An empty context: the worker must not inherit the first caller's
            # request (current span, stage frame) for its whole life.
            self._task = contextvars.Context().run(loop.create_task, self._run())
        pending = self._pending
        pending.append(member)
        if len(pending) == 1 or len(pending) >= self.max_batch_size:
            self._wake()
        return member.future

    async def __call__(self, item: I) -> O:
        return await self.submit(item)

    async def aclose(self, cancel_pending: bool = False) -> None:
        self._closed = True
        if cancel_pending:
            for member in self._pending:
                member.future.cancel()
            self._pending.clear()
        self._wake()
        task = self._task
        if task is not None and task is not asyncio.current_task():
            await asyncio.wait([task])

    async def __aenter__(self) -> AsyncBatcher[I, O]:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        handle = None if timeout is None else loop.call_later(timeout, _release, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    async def _run(self) -> None:
        pending = self._pending
        try:
            while True:
                idle_since_ns = perf_counter_ns()
                while not pending:
                    if self._closed:
                        return
                    await self._wait(None)
                # As in ThreadBatcher: the first arrival or the worker's free time.
                formation_start_ns = max(pending[0].submit_ns, idle_since_ns)
                if self._max_wait_ns and not self._closed:
                    deadline = pending[0].submit_ns + self._max_wait_ns
                    while pending and len(pending) < self.max_batch_size and not self._closed:
                        timeout = (deadline - perf_counter_ns()) / 1e9
                        if timeout <= 0:
                            break
                        await self._wait(timeout)
                members = [m for m in self._take() if not m.future.done()]
                if members:
                    await self._execute(members, formation_start_ns)
        except BaseException as exc:
            self._closed = True
            for member in pending:
                member.future.cancel()
            pending.clear()
            if isinstance(exc, Exception):
                log_once("batcher-worker", "otel-inference: batcher worker stopped: %r", exc)
            raise

    async def _execute(self, members: list[_Member], formation_start_ns: int) -> None:
        telemetry = self._telemetry
        dispatch_ns = perf_counter_ns()
        scope = telemetry.open(members, formation_start_ns, dispatch_ns)
        error: BaseException | None = None
        results: Sequence[Any] = ()
        items = [m.item for m in members]
        try:
            if self._is_async:
                output = await self._fn(items)
            else:
                # copy_context(): the batch span is current in the executor thread too.
                output = await asyncio.get_running_loop().run_in_executor(
                    self._executor, contextvars.copy_context().run, self._fn, items
                )
            results = _check_results(output, len(members))
        except BaseException as exc:  # delivered to every member, unchanged
            error = exc
        end_ns = perf_counter_ns()
        if scope is not None:
            telemetry.cover(scope, members, end_ns)
        if error is not None:
            results = [None] * len(members)
        for member, result in zip(members, results, strict=True):
            future = member.future
            if future.done():  # the caller was cancelled meanwhile
                continue
            if error is None:
                future.set_result(result)
            elif isinstance(error, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(error)
        if scope is not None:
            # Scheduled, not run inline: the worker dispatches the next batch
            # first; the loop records while that batch's ``fn`` awaits.
            asyncio.get_running_loop().call_soon(
                telemetry.record, scope, members, formation_start_ns, dispatch_ns, end_ns, error
            )
        if error is not None and not isinstance(error, Exception):
            raise error  # cancellation of the worker, SystemExit & co.


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
