"""Stages: the public ``stage()`` / ``request()`` API and the recorder every instrumentor uses.

A request's latency is a sum of stages. Each stage records, for EVERY call, its
duration into the ``inference.stage.duration`` histogram (attribute
``inference.stage``), and opens a child span only when the current span is
recording, so unsampled requests pay for the histogram and nothing else.

Usage::

    from otel_inference import request, stage

    with request():                      # or the SERVER span of a web framework
        with stage("tokenize"):
            batch = tokenizer(texts)

    @stage("postprocess")               # decorator: sync and async functions
    def pool(hidden): ...

Timing rules (the report and ``unattributed`` depend on them):

* Durations are monotonic (``perf_counter_ns``) and INCLUSIVE: a stage's time
  includes the stages nested in it. A nested stage carries the enclosing stage's
  name in ``inference.stage.parent`` (absent on top-level stages), so sums over
  top-level stages (``inference_stage_parent=""``) never double count.
* ``request()`` records its own duration as stage ``request`` and the time that no
  top-level stage covered as stage ``unattributed`` (the union of the top-level
  stage intervals is subtracted, so concurrent stages are not double counted).
  Our own enter/exit work between stages is not the application's: it is
  subtracted too, and reported on the request span as
  ``inference.instrumentation.duration``.
* A stage outside any request (no current span) starts a root span that the
  sampler may keep, or records metrics only, per ``OTEL_INFERENCE_ROOT_STAGES``.
* An exception sets the span status and ``error.type`` (also a histogram label)
  and propagates unchanged.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import threading
import traceback
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar, Token
from time import perf_counter_ns, time_ns
from typing import Any, NamedTuple, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.semconv.attributes.exception_attributes import (
    EXCEPTION_STACKTRACE,
    EXCEPTION_TYPE,
)
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TracerProvider,
)

from otel_inference import semconv
from otel_inference._compiled import SPEEDUPS
from otel_inference._logging import log_once
from otel_inference.accounting import (
    MAX_UNSETTLED_INTERVALS as _UNSETTLED,
)
from otel_inference.accounting import HeldSpan, IntervalUnion, StageTally, union_ns
from otel_inference.budgets import NO_BUDGETS, Budgets, budgets_from_env, coerce_budgets
from otel_inference.config import (
    DEFAULT_MAX_SPANS_PER_REQUEST,
    DEFAULT_SPAN_COMPRESSION_THRESHOLD_S,
    ConfigurationError,
    exception_messages_enabled,
    max_spans_per_request,
    root_stage_policy,
    span_compression_threshold,
    stage_call_durations_enabled,
)
from otel_inference.event_loop import loop_monitor
from otel_inference.fastpath import FastHistogram, fast_meter
from otel_inference.metrics import (
    DEFAULT_DURATION_BOUNDARIES,
    StageInstruments,
    create_call_duration_histogram,
    create_stage_instruments,
)
from otel_inference.runtime import COLD_START, GC_GENERATION, GC_PAUSE, gc_monitor
from otel_inference.version import __version__

_logger = logging.getLogger(__name__)

INSTRUMENTATION_SCOPE = "otel_inference"
_MAX_CACHED_ATTRIBUTE_SETS = 1024
# Distinct stage names that get their own metric series; later ones share
# OTHER_STAGE (spans keep the real name). Guards against stage(f"user_{id}").
MAX_STAGE_NAMES = 200
OTHER_STAGE = "_other"

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class RequestAccount:
    """Per-request bookkeeping: the top-level stage intervals, each stage's tally
    (:mod:`otel_inference.accounting`: recorded once when the request ends), the
    span budget, and a bag of figures that one stage can leave for a later stage
    of the same request (e.g. tokenize's token counts for model_forward)."""

    __slots__ = (
        "_covered",
        "_instrumentation_ns",
        "attributes",
        "closed",
        "cold",
        "gc_pause_count",
        "gc_pause_ns",
        "gc_pauses",
        "lock",
        "name",
        "recording",
        "span_seq",
        "spans",
        "spans_dropped",
        "start_ns",
        "sums",
        "tallies",
    )

    def __init__(
        self, name: str, start_ns: int, cold: bool = False, recording: bool = False
    ) -> None:
        self.name = name
        self.start_ns = start_ns
        self.cold = cold
        # The request's span is sampled: its stages may make spans (parent-based sampling).
        self.recording = recording
        self.attributes: dict[str, Any] = {}
        # Covered time besides the top-level tallies' own, and our time between stages.
        self._covered = IntervalUnion()
        self._instrumentation_ns = 0
        # Written by the GC monitor's callback while the request is in flight.
        self.gc_pause_ns = 0
        self.gc_pause_count = 0
        self.gc_pauses: list[Any] = []
        # Stage calls of this request, keyed by (stage, enclosing stage). Guarded by
        # ``lock``: a CUDA-timed stage is recorded from the resolver thread.
        self.tallies: dict[tuple[str, str | None], StageTally] = {}
        # Figures summed over the request, recorded when it ends (record_per_request).
        self.sums: dict[Any, list[Any]] = {}
        self.lock = threading.Lock()
        self.closed = False  # recorded: later records are single calls
        self.spans = 0  # stage spans opened in this request (the cap counts them)
        self.spans_dropped = 0
        self.span_seq = 0  # bumped per opened span: compression needs consecutive calls

    def tally(self, name: str, parent: str | None, cold: bool, context: Any) -> StageTally:
        key = (name, parent)
        tally = self.tallies.get(key)
        if tally is None:
            tally = self.tallies[key] = StageTally(name, parent, cold, context)
        return tally

    def take_span(self, max_spans: int) -> bool:
        """One more stage span for this request, unless it has its ``max_spans`` (or
        has ended): then the call is counted as dropped."""
        if self.spans >= max_spans or self.closed:
            self.spans_dropped += 1
            return False
        self.spans += 1
        self.span_seq += 1
        return True

    def add_interval(self, start_ns: int, end_ns: int) -> None:
        """Count ``[start_ns, end_ns]`` as covered, as a top-level stage's calls are
        (a batch's time for its member requests)."""
        self._covered.add(start_ns, end_ns)

    def add_instrumentation(self, duration_ns: int) -> None:
        """Time otel-inference itself spent in this request outside any stage (a
        top-level stage's own enter and exit work): not the application's time,
        so it must not show as ``unattributed``."""
        self._instrumentation_ns += duration_ns

    def covered_ns(self, start_ns: int, end_ns: int) -> int:
        """Length of the union of top-level stage time, clipped to [start, end]."""
        covered = self._covered
        intervals = list(covered.intervals)
        settled = covered.settled_ns
        for tally in self.tallies.values():
            if tally.parent is None:
                union = tally.union
                intervals += union.intervals
                if union.settled is not None:
                    settled += union.settled.ns
        return settled + union_ns(intervals, start_ns, end_ns) if intervals else settled

    def instrumentation_ns(self) -> int:
        """Our own time between stages (summed: it is a microsecond or two a stage)."""
        return self._instrumentation_ns


# (request account or None, enclosing stage name or None)
_Frame = tuple[RequestAccount | None, str | None]
_FRAME: ContextVar[_Frame | None] = ContextVar("otel_inference_frame", default=None)


def current_stage() -> str | None:
    """Name of the innermost open stage in this context, or None."""
    frame = _FRAME.get()
    return None if frame is None else frame[1]


# current_frame() -> (request account, innermost open stage) in this context, or None
# outside both: one read for instrumentors that need both. The context variable's own
# ``get``: no Python frame of ours on an instrumentor's per-call path.
current_frame: Callable[[], tuple[RequestAccount | None, str | None] | None] = _FRAME.get


def current_request() -> RequestAccount | None:
    """The enclosing ``request()`` account, or None outside one."""
    frame = _FRAME.get()
    return None if frame is None else frame[0]


class _BudgetGauge:
    """One ``inference.stage.budget`` observable gauge per meter provider; it
    exports whatever budgets the recorders bound to that provider hold now."""

    def __init__(self) -> None:
        self.budgets: Budgets = NO_BUDGETS

    def observe(self, _options: CallbackOptions) -> list[Observation]:
        return [
            Observation(seconds, {semconv.INFERENCE_STAGE: stage})
            for stage, seconds in self.budgets.items()
        ]


class _ProviderInstruments:
    def __init__(self, instruments: StageInstruments, gauge: _BudgetGauge) -> None:
        self.instruments = instruments
        self.gauge = gauge


# Instruments are created once per meter provider: the SDK keeps the first
# registration's bucket advisory, so re-creating them would silently not apply.
_instruments_lock = threading.Lock()
_instruments_by_provider: weakref.WeakKeyDictionary[MeterProvider, _ProviderInstruments] = (
    weakref.WeakKeyDictionary()
)
_global_provider_instruments: _ProviderInstruments | None = None


def _instruments_for(
    meter_provider: MeterProvider | None, budgets: Budgets
) -> _ProviderInstruments:
    global _global_provider_instruments
    with _instruments_lock:
        if meter_provider is None:
            cached = _global_provider_instruments
        else:
            cached = _instruments_by_provider.get(meter_provider)
        if cached is None:
            meter = fast_meter(
                metrics.get_meter(
                    INSTRUMENTATION_SCOPE, __version__, meter_provider=meter_provider
                ),
                meter_provider,
            )
            gauge = _BudgetGauge()
            meter.create_observable_gauge(
                semconv.STAGE_BUDGET,
                callbacks=[gauge.observe],
                unit="s",
                description="Configured latency budget of each stage",
            )
            cached = _ProviderInstruments(create_stage_instruments(meter, budgets.values()), gauge)
            if meter_provider is None:
                _global_provider_instruments = cached
            else:
                _instruments_by_provider[meter_provider] = cached
        missing = sorted(set(budgets.values()) - set(cached.instruments.boundaries))
        if missing:
            _logger.warning(
                "budgets %s are not histogram bucket boundaries: the histogram was created "
                "before they were configured; configure budgets before the first stage "
                "(or restart) for exact p95-vs-budget",
                missing,
            )
        cached.gauge.budgets = budgets
        return cached


class RequestSettings(NamedTuple):
    """How stages inside a request are spanned and recorded (see the variables)."""

    max_spans: int = DEFAULT_MAX_SPANS_PER_REQUEST
    compression_threshold: float = DEFAULT_SPAN_COMPRESSION_THRESHOLD_S
    call_durations: bool = False

    @classmethod
    def from_env(cls) -> RequestSettings:
        """Raises :class:`ConfigurationError` naming a malformed variable."""
        return cls(
            max_spans_per_request(), span_compression_threshold(), stage_call_durations_enabled()
        )


def _request_settings_or_defaults() -> RequestSettings:
    """The variables' settings; each malformed one is logged once and left at its default."""
    values = []
    for key, read, default in (
        ("max-spans-env", max_spans_per_request, DEFAULT_MAX_SPANS_PER_REQUEST),
        ("compression-env", span_compression_threshold, DEFAULT_SPAN_COMPRESSION_THRESHOLD_S),
        ("call-duration-env", stage_call_durations_enabled, False),
    ):
        try:
            values.append(read())
        except ConfigurationError as exc:
            log_once(
                key,
                "otel-inference: %s; using the default",
                exc,
                level=logging.ERROR,
                exc_info=False,
            )
            values.append(default)
    return RequestSettings(*values)


class _Binding:
    """Everything the hot path needs, built once per configuration and swapped atomically."""

    __slots__ = (
        "_attribute_sets",
        "_stage_names",
        "breaches",
        "budgets",
        "call_duration",
        "calls",
        "compress_ns",
        "duration",
        "exception_messages",
        "extra_instruments",
        "max_spans",
        "meter",
        "root_spans",
        "tracer",
    )

    def __init__(
        self,
        tracer: trace.Tracer,
        meter: metrics.Meter,
        instruments: StageInstruments,
        budgets: Budgets,
        root_spans: bool,
        exception_messages: bool = False,
        requests: RequestSettings | None = None,
    ) -> None:
        self.tracer = tracer
        self.exception_messages = exception_messages
        self.meter = meter
        self.extra_instruments: dict[Callable[[metrics.Meter], Any], Any] = {}
        self.duration = instruments.duration
        self.breaches = instruments.breaches
        self.calls = instruments.calls
        requests = requests or RequestSettings()
        self.max_spans = requests.max_spans
        self.compress_ns = round(requests.compression_threshold * 1e9)
        self.call_duration = (
            self.instruments(create_call_duration_histogram) if requests.call_durations else None
        )
        self.budgets = budgets
        self.root_spans = root_spans
        self._attribute_sets: dict[tuple[str, str | None, bool], dict[str, Any]] = {}
        self._stage_names: set[str] = set()

    def instruments(self, factory: Callable[[metrics.Meter], T]) -> T:
        """``factory(meter)``'s instruments, created once for this configuration."""
        created = self.extra_instruments.get(factory)
        if created is None:
            created = self.extra_instruments[factory] = factory(self.meter)
        return created

    def metric_attributes(
        self, name: str, parent: str | None, cold: bool = False
    ) -> dict[str, Any]:
        key = (name, parent, cold)
        attributes = self._attribute_sets.get(key)
        if attributes is None:
            attributes = {semconv.INFERENCE_STAGE: self._bounded(name)}
            if parent is not None:
                attributes[semconv.INFERENCE_STAGE_PARENT] = self._bounded(parent)
            if cold:
                attributes[semconv.INFERENCE_COLD_START] = True
            if len(self._attribute_sets) < _MAX_CACHED_ATTRIBUTE_SETS:
                self._attribute_sets[key] = attributes
        return attributes

    def _bounded(self, name: str) -> str:
        names = self._stage_names
        if name in names:
            return name
        if len(names) < MAX_STAGE_NAMES:
            names.add(name)
            return name
        log_once(
            "stage-names",
            "otel-inference: more than %d distinct stage names (e.g. %r): later ones are "
            "labelled %r in metrics (spans keep the name); a stage name should not hold "
            "per-request values",
            MAX_STAGE_NAMES,
            name,
            OTHER_STAGE,
        )
        return OTHER_STAGE


class StageRecorder:
    """Records stages into one tracer and one set of instruments.

    Instrumentors share the default recorder (:func:`get_recorder`) unless they
    are given their own ``tracer_provider`` / ``meter_provider``.
    """

    # Slots: every stage call reads ``_binding`` (the compiled core at its slot).
    __slots__ = (
        "__weakref__",
        "_binding",
        "_budgets",
        "_lock",
        "_meter_provider",
        "_root_stages",
        "_tracer_provider",
    )

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        budgets: Mapping[str, object] | str | None = None,
        root_stages: str | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._binding: _Binding | None = None
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._budgets = None if budgets is None else coerce_budgets(budgets)
        self._root_stages = _check_root_stages(root_stages)

    def configure(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        budgets: Mapping[str, object] | str | None = None,
        root_stages: str | None = None,
    ) -> None:
        """Re-bind to new providers/budgets. Raises :class:`ConfigurationError` on bad
        input, including malformed ``OTEL_INFERENCE_*`` variables when an argument is
        left to the environment."""
        parsed = budgets_from_env() if budgets is None else coerce_budgets(budgets)
        policy = root_stage_policy() if root_stages is None else _check_root_stages(root_stages)
        exception_messages_enabled()  # raises on a malformed variable
        RequestSettings.from_env()  # likewise
        with self._lock:
            self._tracer_provider = tracer_provider
            self._meter_provider = meter_provider
            self._budgets = parsed
            self._root_stages = policy
            self._binding = None
        self._bind()

    @property
    def budgets(self) -> Budgets:
        return self._bind().budgets

    def _bind(self) -> _Binding:
        binding = self._binding
        if binding is not None:
            return binding
        with self._lock:
            if self._binding is not None:
                return self._binding
            budgets = self._budgets
            if budgets is None:
                try:
                    budgets = budgets_from_env()
                except ConfigurationError as exc:
                    log_once(
                        "budgets-env",
                        "otel-inference: %s; continuing WITHOUT latency budgets",
                        exc,
                        level=logging.ERROR,
                        exc_info=False,
                    )
                    budgets = NO_BUDGETS
            policy = self._root_stages
            if policy is None:
                try:
                    policy = root_stage_policy()
                except ConfigurationError as exc:
                    log_once(
                        "root-stages-env",
                        "otel-inference: %s; using 'span'",
                        exc,
                        level=logging.ERROR,
                        exc_info=False,
                    )
                    policy = "span"
            tracer = trace.get_tracer(
                INSTRUMENTATION_SCOPE, __version__, tracer_provider=self._tracer_provider
            )
            meter = fast_meter(
                metrics.get_meter(
                    INSTRUMENTATION_SCOPE, __version__, meter_provider=self._meter_provider
                ),
                self._meter_provider,
            )
            instruments = _instruments_for(self._meter_provider, budgets)
            try:
                exception_messages = exception_messages_enabled()
            except ConfigurationError as exc:
                log_once(
                    "exception-messages-env",
                    "otel-inference: %s; exception messages stay off",
                    exc,
                    level=logging.ERROR,
                    exc_info=False,
                )
                exception_messages = False
            self._binding = _Binding(
                tracer,
                meter,
                instruments.instruments,
                budgets,
                policy == "span",
                exception_messages,
                _request_settings_or_defaults(),
            )
            return self._binding

    def instruments(self, factory: Callable[[metrics.Meter], T]) -> T:
        """Instruments an instrumentor records besides stage durations.

        ``factory(meter)`` creates them (e.g. a dataclass of counters); the result is
        cached per configuration, so after :meth:`configure` binds new providers the
        next call creates them on the new meter. Call it per record, not once at
        ``instrument()`` time; the cached path is a dict lookup.
        """
        return (self._binding or self._bind()).instruments(factory)

    def stage(self, name: str, **attributes: Any) -> StageScope:
        """A stage as a context manager (sync or async) or a decorator."""
        return StageScope(self, name, attributes)

    def request(self, name: str = "inference.request", **attributes: Any) -> RequestScope:
        """A request boundary: records ``request`` and ``unattributed`` for every request."""
        return RequestScope(self, name, attributes)

    def record_per_request(
        self, instrument: Any, value: float, attributes: Mapping[str, Any]
    ) -> None:
        """Record ``value`` into ``instrument`` (a histogram or a counter) for the
        current request: inside an open request, values with the same instrument and
        attributes are summed and recorded once when it ends (a request's bytes
        serialised over 500 small calls is one record, not 500); outside a request,
        now. Never raises. For a figure added on every call of a hot path, make a
        :meth:`request_sum` once instead."""
        _add_per_request((id(instrument), *attributes.items()), instrument, value, attributes)

    def request_sum(
        self, factory: Callable[[metrics.Meter], Any], field: str, attributes: Mapping[str, Any]
    ) -> RequestSum:
        """A figure summed per request into ``getattr(self.instruments(factory), field)``
        with ``attributes``: made once, then ``add(value)`` per call."""
        return RequestSum(self, factory, field, attributes)

    def adopt_request(self) -> AdoptedRequestScope:
        """Account the stages of a request whose span another instrumentation owns
        (a web framework's SERVER span): enter it inside that span."""
        return AdoptedRequestScope(self)

    def start(self, name: str, attributes: Mapping[str, Any] | None = None) -> StageScope:
        """Open a stage now (for instrumentors); close it with ``end()``."""
        scope = StageScope(self, name, attributes)
        scope.__enter__()
        return scope

    def capture(self) -> StageContext:
        """Capture where a stage measured later, elsewhere, belongs: the calling
        context's request account, enclosing stage and current span.

        Cheap (a few context-variable reads, no allocation besides the result);
        call it on the producer's side, e.g. when an item is enqueued, and hand
        the result to :meth:`record_interval` or :meth:`start_batch` on the
        consumer's side.
        """
        context = otel_context.get_current()
        return StageContext(_FRAME.get(), context, trace.get_current_span(context))

    def record_interval(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        *,
        context: StageContext | None = None,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Link] | None = None,
        exc: BaseException | None = None,
        span: bool = True,
        cover: bool = True,
    ) -> SpanContext | None:
        """Record a stage that ran from ``start_ns`` to ``end_ns`` (``perf_counter_ns``
        values) as if it had been opened in ``context`` (default: the current one).

        The rules of :class:`StageScope` hold, judged on the captured context: the
        histogram is always recorded (label ``inference.stage.parent`` when the
        captured context was inside a stage), a breach is counted past the
        budget, a top-level stage covers its interval of the captured request
        (``cover=False`` when the caller did it already with
        :meth:`StageContext.cover`; inside a request the stage's tally covers it
        anyway), and a span is made only when the captured
        span was recording at capture time, or as a root span under
        ``OTEL_INFERENCE_ROOT_STAGES=span`` when there was no span at all
        (``span=False`` never makes one). The span is backdated to the interval
        (wall clock derived from the monotonic one); ``attributes`` and ``links``
        go on it. Returns the span's context when a recording span was made,
        so that other spans can link to it; otherwise ``None``. Never raises.
        """
        try:
            binding = self._binding or self._bind()
            captured = self.capture() if context is None else context
            duration_ns = max(0, end_ns - start_ns)
            account = captured.account
            if account is not None:
                with account.lock:
                    if not account.closed:
                        return self._interval_in_request(
                            binding,
                            account,
                            name,
                            start_ns,
                            duration_ns,
                            captured,
                            attributes,
                            links,
                            exc,
                            span,
                            cover,
                        )
            seconds = duration_ns / 1e9
            metric_attributes = binding.metric_attributes(name, captured.parent, captured.cold)
            if exc is not None:
                metric_attributes = {**metric_attributes, semconv.ERROR_TYPE: _error_type(exc)}
            budget = binding.budgets.get(name)
            exceeded = budget is not None and seconds > budget
            span_context = None
            if span and (
                captured.recording or (binding.root_spans and not captured.span_context.is_valid)
            ):
                start_wall_ns, new_span = _start_interval_span(
                    binding, name, captured, attributes, links, start_ns
                )
                if new_span.is_recording():
                    span_context = new_span.get_span_context()
                    if _LOOP.started:
                        _LOOP.annotate(new_span, start_ns, start_ns + duration_ns)
                _finish_span(new_span, binding, start_wall_ns + duration_ns, exc, budget, exceeded)
            binding.duration.record(seconds, metric_attributes)
            if binding.call_duration is not None:
                binding.call_duration.record(seconds, metric_attributes)
            if exceeded:
                binding.breaches.add(1, metric_attributes)
            if cover:
                captured.cover(start_ns, start_ns + duration_ns)
            return span_context
        except Exception:
            log_once(
                "stage-interval", "otel-inference: failed to record stage", level=logging.ERROR
            )
            return None

    def _interval_in_request(
        self,
        binding: _Binding,
        account: RequestAccount,
        name: str,
        start_ns: int,
        duration_ns: int,
        captured: StageContext,
        attributes: Mapping[str, Any] | None,
        links: Sequence[Link] | None,
        exc: BaseException | None,
        span: bool,
        cover: bool,
    ) -> SpanContext | None:
        """:meth:`record_interval` for a captured request still open (its lock held):
        the call joins the request's tally; its span, if any, is held like a stage's."""
        end_ns = start_ns + duration_ns
        error_type = None if exc is None else _error_type(exc)
        tally = account.tally(name, captured.parent, captured.cold, captured.context)
        tally.add(start_ns, end_ns, error_type)
        if cover:
            captured.cover(start_ns, end_ns)
        if binding.call_duration is not None:
            metric_attributes = binding.metric_attributes(name, captured.parent, captured.cold)
            if error_type is not None:
                metric_attributes = {**metric_attributes, semconv.ERROR_TYPE: error_type}
            binding.call_duration.record(duration_ns / 1e9, metric_attributes)
        if not (span and captured.recording) or not account.take_span(binding.max_spans):
            return None
        start_wall_ns, new_span = _start_interval_span(
            binding, name, captured, attributes, links, start_ns
        )
        if exc is not None and new_span.is_recording():
            _mark_error(new_span, exc, binding.exception_messages)
        if _LOOP.started and new_span.is_recording():
            _LOOP.annotate(new_span, start_ns, end_ns)
        held = HeldSpan(
            new_span,
            start_ns,
            end_ns,
            start_wall_ns + duration_ns,
            False,  # recorded after the fact: nothing can join it
            captured.context,
            account.span_seq,
            0,
        )
        _hold(tally, held)
        return new_span.get_span_context() if new_span.is_recording() else None

    def start_batch(
        self,
        name: str,
        members: Sequence[StageContext | None],
        attributes: Mapping[str, Any] | None = None,
    ) -> BatchStageScope:
        """Open, now, a stage executed once on behalf of several requests (a batch).

        ``members`` are the requests' captured contexts (:meth:`capture`; ``None``
        for a member that must not be recorded). Close it with ``end()`` (or
        ``exit_context()`` then ``record()``). See :class:`BatchStageScope`.
        """
        scope = BatchStageScope(self, name, members, attributes)
        scope.__enter__()
        return scope


def _check_root_stages(policy: str | None) -> str | None:
    if policy is None:
        return None
    return root_stage_policy({"OTEL_INFERENCE_ROOT_STAGES": policy})


def _error_type(exc: BaseException) -> str:
    return type(exc).__qualname__


class _Scope:
    """Shared machinery of stage and request scopes: decorator and async forms. No
    slots of its own: a stage scope's layout is its core's (maybe compiled)."""

    __slots__ = ()
    _recorder: StageRecorder
    _name: str
    _attributes: Mapping[str, Any] | None

    def __init__(
        self, recorder: StageRecorder, name: str, attributes: Mapping[str, Any] | None
    ) -> None:
        self._recorder = recorder
        self._name = name
        self._attributes = attributes

    def _fresh(self) -> _Scope:
        return type(self)(self._recorder, self._name, self._attributes)

    def __enter__(self) -> _Scope:  # pragma: no cover - overridden
        raise NotImplementedError

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        raise NotImplementedError  # pragma: no cover - overridden

    async def __aenter__(self) -> _Scope:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        return self.__exit__(exc_type, exc, tb)

    def __call__(self, func: F) -> F:
        """Decorate a function: every call is its own scope."""
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with self._fresh():
                    return await func(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self._fresh():
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


def _cold_outside_request(parent: str | None, current: Span) -> bool:
    """While the process is cold, a stage outside ``request()`` is cold; the first
    top-level stage of each new trace counts as a (zero-code) request."""
    span_context = current.get_span_context()
    if parent is None and span_context.is_valid:
        return COLD_START.take_trace(span_context.trace_id)
    return True


_GC = gc_monitor()
_LOOP = loop_monitor()  # event-loop monitor (#16): stage/request hooks below, when started
_GC_PENDING = _GC.pending
_GC_BOUNDARIES = (0.00001, 0.000025, 0.00005, 0.000075)
_GC_ATTRIBUTES = {generation: {GC_GENERATION: generation} for generation in range(3)}


def _gc_pause_histogram(meter: metrics.Meter) -> metrics.Histogram:
    from otel_inference.metrics import DEFAULT_DURATION_BOUNDARIES

    return meter.create_histogram(
        GC_PAUSE,
        unit="s",
        description="Duration of each garbage collection (the whole process stops)",
        explicit_bucket_boundaries_advisory=(*_GC_BOUNDARIES, *DEFAULT_DURATION_BOUNDARIES),
    )


def _drain_gc_pauses(binding: _Binding) -> None:
    """Record pauses the GC callback queued (it must not call the SDK itself)."""
    histogram = binding.instruments(_gc_pause_histogram)
    pending = _GC_PENDING
    while pending:
        try:
            pause = pending.popleft()
        except IndexError:  # drained by another thread
            return
        histogram.record(
            pause.duration_ns / 1e9, _GC_ATTRIBUTES.get(pause.generation, _GC_ATTRIBUTES[2])
        )


# A scope entered this soon after it was made was made for this ``with``: its making
# is counted as our own time. One made long before (kept, then entered) is not.
_FRESH_SCOPE_NS = 100_000


_HOT_PATH_FAILURES = {
    "stage-enter": "otel-inference: failed to open stage",
    "stage-exit": "otel-inference: failed to close stage",
}


def _hot_path_failed(key: str, exc: BaseException) -> None:
    """An ``except Exception`` of a stage's enter or exit: logged once, never raised
    into the host application (called by both cores)."""
    log_once(key, _HOT_PATH_FAILURES[key], level=logging.ERROR, exc_info=exc)


class _PyStageCore:
    """A stage scope's hot path in Python: its fields, ``__enter__``, ``__exit__`` and
    ``finish``. ``_speedups.StageCore`` (``_speedups.c``) is the same code compiled,
    step for step, and is used when it was built (``OTEL_INFERENCE_SPEEDUPS``); both
    call the same :class:`StageScope` methods for everything off the hot path."""

    __slots__ = (
        "_account",
        "_attributes",
        "_binding",
        "_cold",
        "_context_token",
        "_created_ns",
        "_enter_ns",
        "_frame_token",
        "_joined",
        "_metric_context",
        "_name",
        "_outer_context",
        "_parent",
        "_probe",
        "_recorder",
        "_span",
        "_start_ns",
        "_start_wall_ns",
        "_tally",
    )

    def __init__(
        self, recorder: StageRecorder, name: str, attributes: Mapping[str, Any] | None = None
    ) -> None:
        self._recorder = recorder
        self._name = name
        self._attributes = attributes
        # Making the scope is our work too: ``with stage(...)`` counts from here.
        self._created_ns = perf_counter_ns()

    def __enter__(self) -> Any:
        return self.enter_in(None)

    def enter_in(self, current: otel_context.Context | None) -> Any:
        """``__enter__`` for a caller that has just read the current OpenTelemetry
        context (``current``): a sampled request's stage does not read it again."""
        enter_ns = perf_counter_ns()
        if enter_ns - self._created_ns < _FRESH_SCOPE_NS:
            enter_ns = self._created_ns
        self._span = None
        self._joined = None
        self._tally = None
        self._metric_context = None
        try:
            binding = self._recorder._binding or self._recorder._bind()
            self._binding = binding
            frame = _FRAME.get()
            account = None if frame is None else frame[0]
            if account is None:
                self._enter_alone(binding, None if frame is None else frame[1])  # type: ignore[attr-defined]
            else:
                # Inside a request. Unsampled, this is all a call costs: no context or
                # span lookups (the request's sampling decision holds for its stages).
                self._account = account
                self._parent = parent = frame[1]  # type: ignore[index]
                self._cold = account.cold
                tally = account.tallies.get((self._name, parent)) or self._new_tally(account)  # type: ignore[attr-defined]
                if account.recording:
                    context = otel_context.get_current() if current is None else current
                    self._metric_context = self._outer_context = context
                    held = tally.held
                    if (
                        held is not None
                        and held.compressible
                        and held.context is context
                        and held.seq == account.span_seq
                    ):
                        # A consecutive short call of the stage joins its held span
                        # (compression); finish() checks that it stays short.
                        self._joined = held
                        if binding.call_duration is None:
                            self._tally = tally
                    else:
                        self._enter_sampled(binding, account, context)  # type: ignore[attr-defined]
                elif binding.call_duration is None:
                    self._tally = tally  # finish() only counts the call
            self._frame_token = _FRAME.set((account, self._name))
        except Exception as exc:  # never break the host application
            _hot_path_failed("stage-enter", exc)
            self._binding = None
            self._frame_token = None
            self._account = None
            self._tally = None
        self._enter_ns = enter_ns
        self._start_ns = perf_counter_ns()
        # Watches the running loop; a sync stage's thread CPU clock (#16).
        self._probe = _LOOP.stage_probe(self._span) if _LOOP.started else None
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        self.finish(perf_counter_ns(), exc)
        return False

    @property
    def is_recording(self) -> bool:
        """True when this stage has a sampled span (worth computing costly attributes)."""
        return self._span is not None and self._span.is_recording()

    def finish(self, end_ns: int, exc: BaseException | None = None) -> None:
        """Close the stage as having ended at ``end_ns`` (``perf_counter_ns``): for an
        instrumentor that timed the call itself and did some work of its own since
        (sized the payload, set span attributes), which is not the stage's."""
        tally = self._tally
        if (
            tally is not None
            and exc is None
            and (self._joined is None or self._stays_joined(end_ns))  # type: ignore[attr-defined]
        ):
            # The hot path: a successful call in an unsampled request, or one that joins
            # its stage's held span, added to the request's tally (a lock-free append);
            # recorded when the request ends.
            try:
                _FRAME.reset(self._frame_token)  # type: ignore[arg-type]
                self._frame_token = None
                account = self._account
                start_ns = self._start_ns
                if account.closed:  # type: ignore[union-attr]
                    self.record(end_ns - start_ns)  # type: ignore[attr-defined]
                    return  # its request ended: a single call
                intervals = tally.union.intervals
                intervals.append((start_ns, end_ns))
                if len(intervals) > _UNSETTLED:
                    tally.union.settle()
                joined = self._joined
                if joined is not None:
                    joined.join(start_ns, end_ns)
                if self._parent is None:
                    account._instrumentation_ns += (  # type: ignore[union-attr]
                        start_ns - self._enter_ns + perf_counter_ns() - end_ns
                    )
                if _GC_PENDING:
                    _drain_gc_pauses(self._binding)  # type: ignore[arg-type]
            except Exception as exc:  # never break the host application
                _hot_path_failed("stage-exit", exc)
            return
        self._finish_slow(end_ns, exc)  # type: ignore[attr-defined]


def _compiled_core() -> type | None:
    """``_speedups.StageCore`` bound to this module's state, or None (not built, or
    turned off: :mod:`otel_inference._compiled`)."""
    if SPEEDUPS is None:
        return None
    SPEEDUPS.bind(
        frame=_FRAME,
        loop=_LOOP,
        gc_pending=_GC_PENDING,
        drain_gc=_drain_gc_pauses,
        failed=_hot_path_failed,
        max_unsettled=_UNSETTLED,
        fresh_scope_ns=_FRESH_SCOPE_NS,
        clock_namespace=globals(),
        get_context=otel_context.get_current,
        # Read and written at their slots (and tallies made there) when compiled.
        account_type=RequestAccount,
        tally_type=StageTally,
        union_type=IntervalUnion,
        binding_type=_Binding,
        recorder_type=StageRecorder,
    )
    return SPEEDUPS.StageCore


_StageCore: type = _compiled_core() or _PyStageCore
# Which core stage scopes run on: "compiled" or "python" (tests and bug reports).
STAGE_CORE = "python" if _StageCore is _PyStageCore else "compiled"


class StageScope(_StageCore, _Scope):  # type: ignore[misc, valid-type]
    """One execution of a stage. Single use as a context manager; as a
    decorator each call gets a fresh scope.

    Inside a request the call is added to the request's tally of the stage and
    recorded when the request ends; its span (when sampled) is held open until
    another span of the stage takes its place or the request ends, and a
    consecutive short call of the same stage joins it instead of making its own
    (span compression). Outside a request every call is recorded on exit.

    ``__init__``, ``__enter__``, ``__exit__`` and ``finish`` are the core's
    (:class:`_PyStageCore`, or its compiled twin); the methods below are the
    branches off the hot path, which both cores call.
    """

    __slots__ = ()

    def _new_tally(self, account: RequestAccount) -> StageTally:
        # setdefault: a racing thread's tally is kept, not replaced
        return account.tallies.setdefault(
            (self._name, self._parent), StageTally(self._name, self._parent, self._cold)
        )

    def _enter_sampled(
        self, binding: _Binding, account: RequestAccount, context: otel_context.Context
    ) -> None:
        """Inside a sampled request, a call that cannot join its stage's held span:
        take one of the request's spans (the cap), or none."""
        if not trace.get_current_span(context).is_recording():
            return
        if account.take_span(binding.max_spans):
            self._open_span(binding, context)

    def _enter_alone(self, binding: _Binding, parent: str | None) -> None:
        """Outside any request (or inside a batch): a single call with its own span."""
        self._account = None
        self._parent = parent
        context = otel_context.get_current()
        self._metric_context = self._outer_context = context
        current = trace.get_current_span(context)
        self._cold = COLD_START.active and _cold_outside_request(parent, current)
        if current.is_recording() or (
            binding.root_spans and not current.get_span_context().is_valid
        ):
            self._open_span(binding, context)

    def _open_span(
        self, binding: _Binding, context: otel_context.Context, start_wall_ns: int | None = None
    ) -> None:
        """Start the stage span; attach it as the current span unless backdated
        (a span made after its call, for a call that could not join its held span)."""
        attributes: dict[str, Any] = {semconv.INFERENCE_STAGE: self._name}
        if self._parent is not None:
            attributes[semconv.INFERENCE_STAGE_PARENT] = self._parent
        if self._cold:
            attributes[semconv.INFERENCE_COLD_START] = True
        if self._attributes:
            attributes.update(self._attributes)
        self._start_wall_ns = time_ns() if start_wall_ns is None else start_wall_ns
        span = binding.tracer.start_span(
            self._name,
            context=context,
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=self._start_wall_ns,
        )
        self._span = span
        if start_wall_ns is not None:
            return
        span_context = trace.set_span_in_context(span, context)
        # Metrics are recorded in the stage's own context, so an exemplar links
        # the histogram bucket to this stage's span (not its parent), even when
        # record() runs later on another thread.
        self._metric_context = span_context
        # Attached even when the root span is not sampled, so that nested stages
        # see a valid parent and take the cheap path instead of starting roots.
        self._context_token = otel_context.attach(span_context)

    def set_attribute(self, key: str, value: Any) -> None:
        """Set a span attribute (no-op on the unsampled path)."""
        span = self._span
        if span is not None:
            span.set_attribute(key, value)

    def end(self, exc: BaseException | None = None) -> None:
        """Close a stage opened with :meth:`StageRecorder.start`."""
        self.finish(perf_counter_ns(), exc)

    def _finish_slow(self, end_ns: int, exc: BaseException | None) -> None:
        """``finish`` off the hot path: a failed call, a sampled call with a span of
        its own, a call outside a request, a call recorded per call."""
        self.exit_context()
        self.record(end_ns - self._start_ns, exc)
        account = self._account
        if account is not None and self._parent is None:
            # Our own enter and exit work, around the stage: not the application's.
            account.add_instrumentation(
                self._start_ns - self._enter_ns + perf_counter_ns() - end_ns
            )

    def _stays_joined(self, end_ns: int) -> bool:
        """A call that joined its stage's held span stays in it: successful (the
        caller checked), within the compression threshold and the budget, and the
        held span still the stage's latest. Otherwise it gets a span of its own."""
        joined = self._joined
        return (
            end_ns - self._start_ns <= joined.limit_ns  # type: ignore[union-attr]
            and self._tally.held is joined  # type: ignore[union-attr]
        )

    def exit_context(self) -> None:
        """Restore the caller's context (stage nesting and current span).

        Separate from :meth:`record` so an instrumentor can leave the context on
        the calling thread now and record a duration resolved later (CUDA events).
        """
        try:
            if self._frame_token is not None:
                _FRAME.reset(self._frame_token)
                self._frame_token = None
            if self._span is not None:
                otel_context.detach(self._context_token)
        except Exception:
            log_once("stage-exit", "otel-inference: failed to close stage", level=logging.ERROR)

    def record(
        self,
        duration_ns: int,
        exc: BaseException | None = None,
        *,
        end_time_ns: int | None = None,
        **span_attributes: Any,
    ) -> None:
        """Record the call: inside a request, into the request's tally of the stage
        (recorded when the request ends); outside one (or after it ended), the
        histogram and budget check now. Ends or holds the span.

        ``end_time_ns`` (wall clock, ``time_ns``) ends the span there instead of at
        its start plus ``duration_ns``: a device-timed stage whose span should end
        at the device's true end while the histogram gets the device duration."""
        binding = self._binding
        if binding is None:
            return
        try:
            account = self._account
            if account is not None:
                with account.lock:
                    if not account.closed:
                        self._add_to_request(
                            binding, account, duration_ns, exc, end_time_ns, span_attributes
                        )
                        return
            self._record_call(binding, duration_ns, exc, end_time_ns, span_attributes)
        except Exception:
            log_once("stage-record", "otel-inference: failed to record stage", level=logging.ERROR)
        finally:
            if _GC_PENDING:
                _drain_gc_pauses(binding)

    def _record_call(
        self,
        binding: _Binding,
        duration_ns: int,
        exc: BaseException | None,
        end_time_ns: int | None,
        span_attributes: Mapping[str, Any],
    ) -> None:
        """A single call, recorded on its own (outside a request)."""
        seconds = duration_ns / 1e9
        attributes = binding.metric_attributes(self._name, self._parent, self._cold)
        if exc is not None:
            attributes = {**attributes, semconv.ERROR_TYPE: _error_type(exc)}
        budget = binding.budgets.get(self._name)
        exceeded = budget is not None and seconds > budget
        span = self._span
        if span is not None:
            if _LOOP.started and span.is_recording():
                _LOOP.annotate(span, self._start_ns, self._start_ns + duration_ns, self._probe)
            end_time = self._start_wall_ns + duration_ns if end_time_ns is None else end_time_ns
            _finish_span(span, binding, end_time, exc, budget, exceeded, span_attributes)
        elif self._joined is not None:  # its request ended before this late record
            self._open_span(binding, self._outer_context, _wall_of(self._start_ns))
            _finish_span(
                self._span,  # type: ignore[arg-type]
                binding,
                self._start_wall_ns + duration_ns,
                exc,
                budget,
                exceeded,
                span_attributes,
            )
        binding.duration.record(seconds, attributes, context=self._metric_context)
        if binding.call_duration is not None:
            binding.call_duration.record(seconds, attributes, context=self._metric_context)
        if exceeded:
            binding.breaches.add(1, attributes, context=self._metric_context)
        account = self._account
        if account is not None and self._parent is None:
            account.add_interval(self._start_ns, self._start_ns + duration_ns)

    def _add_to_request(
        self,
        binding: _Binding,
        account: RequestAccount,
        duration_ns: int,
        exc: BaseException | None,
        end_time_ns: int | None,
        span_attributes: Mapping[str, Any],
    ) -> None:
        """A call inside a request (the account's lock is held)."""
        start_ns = self._start_ns
        end_ns = start_ns + duration_ns
        error_type = None if exc is None else _error_type(exc)
        tally = account.tally(self._name, self._parent, self._cold, self._metric_context)
        if tally.context is None:  # the exemplar of the request's record: the first span
            tally.context = self._metric_context
        tally.add(start_ns, end_ns, error_type)  # a top-level tally covers request time
        if binding.call_duration is not None:
            attributes = binding.metric_attributes(self._name, self._parent, self._cold)
            if error_type is not None:
                attributes = {**attributes, semconv.ERROR_TYPE: error_type}
            binding.call_duration.record(
                duration_ns / 1e9, attributes, context=self._metric_context
            )
        budget = binding.budgets.get(self._name)
        compressible = (
            error_type is None
            and duration_ns <= binding.compress_ns
            and (budget is None or duration_ns / 1e9 <= budget)
        )
        joined = self._joined
        if joined is not None:
            if compressible and tally.held is joined:
                joined.join(start_ns, end_ns)
                return
            # Failing, slow or over budget: never hidden in a compressed span.
            if not account.take_span(binding.max_spans):
                return
            self._open_span(binding, self._outer_context, _wall_of(start_ns))
        span = self._span
        if span is None:
            return  # unsampled, or past the cap
        if span.is_recording():
            if span_attributes:
                span.set_attributes(span_attributes)
            if exc is not None:
                _mark_error(span, exc, binding.exception_messages)
            if _LOOP.started:
                _LOOP.annotate(span, start_ns, end_ns, self._probe)
        end_wall_ns = self._start_wall_ns + duration_ns if end_time_ns is None else end_time_ns
        held = HeldSpan(
            span,
            start_ns,
            end_ns,
            end_wall_ns,
            compressible,
            self._outer_context,
            account.span_seq,
            _join_limit_ns(binding, budget),
        )
        _hold(tally, held)


if STAGE_CORE == "compiled":
    # recorder.stage(...) makes its scope in C: no Python frame (nor empty attribute
    # dict) per call. Same result as the method above.
    SPEEDUPS.bind_scope(StageScope)
    StageRecorder.stage = SPEEDUPS.stage_method  # type: ignore[method-assign]


@functools.cache
def python_core_stage_scope() -> type:
    """:class:`StageScope` on the pure-Python core, whichever core ``StageScope`` runs
    on: the same methods off the hot path. For same-process comparisons of the two
    cores (the parity tests, ``benchmarks/bench_request_accounting.py``)."""
    if _StageCore is _PyStageCore:
        return StageScope
    methods = {
        key: value
        for key, value in vars(StageScope).items()
        if key not in ("__slots__", "__dict__", "__weakref__", "__module__", "__doc__")
    }
    return type("PyStageScope", (_PyStageCore, _Scope), {"__slots__": (), **methods})


def _join_limit_ns(binding: _Binding, budget: float | None) -> int:
    """The longest call that may join a held span: the compression threshold, or the
    stage's budget if shorter (a call over budget always gets its own span). Taken
    when the span is held: a reconfiguration applies from the stage's next span."""
    if budget is None:
        return binding.compress_ns
    return min(binding.compress_ns, math.floor(budget * 1e9))


def _hold(tally: StageTally, held: HeldSpan) -> None:
    """Make ``held`` the stage's latest span; the one it replaces ends (no verdict:
    only the last span of the stage in the request carries it)."""
    previous, tally.held = tally.held, held
    if previous is not None:
        _end_held(previous, None, False)


def _start_interval_span(
    binding: _Binding,
    name: str,
    captured: StageContext,
    attributes: Mapping[str, Any] | None,
    links: Sequence[Link] | None,
    start_ns: int,
) -> tuple[int, Span]:
    """The span of a stage recorded after the fact, backdated to ``start_ns``."""
    span_attributes: dict[str, Any] = {semconv.INFERENCE_STAGE: name}
    if captured.parent is not None:
        span_attributes[semconv.INFERENCE_STAGE_PARENT] = captured.parent
    if captured.cold:
        span_attributes[semconv.INFERENCE_COLD_START] = True
    if attributes:
        span_attributes.update(attributes)
    start_wall_ns = _wall_of(start_ns)
    span = binding.tracer.start_span(
        name,
        context=captured.context,
        kind=SpanKind.INTERNAL,
        attributes=span_attributes,
        links=links,
        start_time=start_wall_ns,
    )
    return start_wall_ns, span


def _wall_of(perf_ns: int) -> int:
    """The wall-clock time (``time_ns``) of a past ``perf_counter_ns`` reading."""
    return time_ns() - (perf_counter_ns() - perf_ns)


def _end_held(held: HeldSpan, budget: float | None, exceeded: bool) -> None:
    """End a held stage span: a compressed one says how many calls it stands for and
    their time; the stage's last span carries the request's budget verdict."""
    span = held.span
    if span.is_recording():
        if held.calls > 1:
            span.set_attribute(semconv.STAGE_CALLS, held.calls)
            span.set_attribute(semconv.INFERENCE_STAGE_CALLS_DURATION, held.busy_ns / 1e9)
        if budget is not None:
            span.set_attribute(semconv.INFERENCE_BUDGET, budget)
            span.set_attribute(semconv.INFERENCE_BUDGET_EXCEEDED, exceeded)
    _end_span(span, held.end_wall_ns)


def _end_span(span: Span, end_time_ns: int) -> None:
    """End a stage span with instrumentation suppressed: a synchronous span processor
    exports here, and its work (a JSON dump, an HTTP call) is not a stage of ours."""
    with suppress_instrumentation():
        span.end(end_time=end_time_ns)


class RequestSum:
    """A figure summed over each request and recorded once when it ends, e.g. the
    bytes of a request's 500 small dumps (:meth:`StageRecorder.request_sum`).
    Outside a request every value is recorded at once.

    Usage::

        size = recorder.request_sum(create_instruments, "size", {"format": "json"})
        size.add(len(payload))          # per call: a dict lookup and an addition
    """

    __slots__ = ("_attributes", "_factory", "_field", "_recorder")

    def __init__(
        self,
        recorder: StageRecorder,
        factory: Callable[[metrics.Meter], Any],
        field: str,
        attributes: Mapping[str, Any],
    ) -> None:
        self._recorder = recorder
        self._factory = factory
        self._field = field
        self._attributes = attributes

    def instrument(self) -> Any:
        """The instrument, for the recorder's current configuration."""
        return getattr(self._recorder.instruments(self._factory), self._field)

    def add(self, value: float) -> None:
        """Add ``value`` to the current request's sum (never raises)."""
        # Keyed by this object: no key to build per call. Sums of two handles for one
        # series are merged when the request ends.
        try:
            frame = _FRAME.get()
            if frame is not None:
                account = frame[0]
                if account is not None and not account.closed:
                    entry = account.sums.get(self)
                    if entry is not None:
                        entry[2] += value  # one step under the GIL
                        return
        except Exception:
            pass  # _add_per_request logs it
        _add_per_request(self, None, value, self._attributes)


def _add_per_request(
    key: Any, instrument: Any, value: float, attributes: Mapping[str, Any]
) -> None:
    """Add ``value`` to the current request's sum under ``key`` (recorded when the
    request ends), or record it now outside a request. ``instrument`` None: ``key``
    is a :class:`RequestSum`, which resolves it."""
    try:
        if instrument is None:
            instrument = key.instrument()
        frame = _FRAME.get()
        if frame is not None:
            account = frame[0]
            if account is not None and not account.closed:
                # No lock: under the GIL the sum's update is one step, and setdefault
                # keeps the entry a racing thread made.
                entry = account.sums.get(key)
                if entry is None:
                    entry = account.sums.setdefault(key, [instrument, attributes, 0])
                entry[2] += value
                return
        _emit(instrument, value, attributes)
    except Exception:
        log_once("per-request", "otel-inference: failed to record a figure", level=logging.ERROR)


def _emit(instrument: Any, value: float, attributes: Mapping[str, Any]) -> None:
    if hasattr(instrument, "record"):
        instrument.record(value, attributes)
    else:
        instrument.add(value, attributes)


def _close_account(binding: _Binding, account: RequestAccount, request_span: Span | None) -> None:
    """The request ended: record each of its stages once (time, calls, budget) and
    its per-request figures, end the held spans, and tell the request span what
    was dropped or breached."""
    with account.lock:
        account.closed = True
        tallies = list(account.tallies.values())
        spanned = account.spans  # held spans exist only where spans were taken
    if not spanned:  # nothing to end: records only, which run no exporter
        _record_account(binding, account, tallies, request_span)
        return
    # Ending spans can run exporters here (a SimpleSpanProcessor): their own work
    # (a JSON dump, an HTTP call) is not the application's, and must not be recorded.
    with suppress_instrumentation():
        _record_account(binding, account, tallies, request_span)


def _record_account(
    binding: _Binding,
    account: RequestAccount,
    tallies: list[StageTally],
    request_span: Span | None,
) -> None:
    totals: dict[tuple[Any, ...], list[Any]] = {}
    for instrument, attributes, value in account.sums.values():
        series = (id(instrument), *attributes.items())  # one record per series
        total = totals.get(series)
        if total is None:
            totals[series] = [instrument, attributes, value]
        else:
            total[2] += value
    for instrument, attributes, value in totals.values():
        _emit(instrument, value, attributes)
    rows, breaches = tally_rows(tallies, binding, _end_held, semconv.ERROR_TYPE)
    duration, calls_histogram = binding.duration, binding.calls
    if type(duration) is FastHistogram and type(calls_histogram) is FastHistogram:
        if rows:  # every stage's time and call count in one batch
            duration.record_pairs(calls_histogram, rows)
    else:
        for seconds, calls, attributes, context in rows:
            duration.record(seconds, attributes, context=context)
            calls_histogram.record(calls, attributes, context=context)
    for _name, attributes, context in breaches:
        binding.breaches.add(1, attributes, context=context)
    if request_span is not None and request_span.is_recording():
        if account.spans_dropped:
            request_span.set_attribute(semconv.INFERENCE_SPANS_DROPPED, account.spans_dropped)
        if breaches:
            request_span.set_attribute(
                semconv.INFERENCE_BUDGET_EXCEEDED_STAGES, [name for name, _, _ in breaches]
            )


def _tally_rows(
    tallies: list[StageTally], binding: _Binding, end_held: Callable[..., None], error_key: str
) -> tuple[list[tuple[float, int, Any, Any]], list[tuple[str, Any, Any]]]:
    """The records of an ended request's tallies: ``(seconds, calls, attributes,
    context)`` per stage with a finished call, ``(name, attributes, context)`` per
    stage over its budget; each held span ended (``end_held``) with the verdict.
    Compiled (``_speedups.tally_rows``) when built: it runs per stage and request."""
    rows: list[tuple[float, int, Any, Any]] = []
    breaches: list[tuple[str, Any, Any]] = []
    attribute_sets = binding._attribute_sets
    budgets = binding.budgets
    for tally in tallies:
        union = tally.union
        intervals = union.intervals
        if union.settled is None and len(intervals) == 1:
            lo, hi = intervals[0]  # a single call: its own length
            seconds, calls = (hi - lo) / 1e9, 1
        else:
            calls = union.count
            if not calls:
                continue  # opened, not finished yet: recorded as a single call when it is
            seconds = union.total_ns() / 1e9
        name = tally.name
        attributes = attribute_sets.get(
            (name, tally.parent, tally.cold)
        ) or binding.metric_attributes(name, tally.parent, tally.cold)
        if tally.error_type is not None:
            attributes = {**attributes, error_key: tally.error_type}
        budget = budgets.get(name)
        exceeded = budget is not None and seconds > budget
        if tally.held is not None:
            end_held(tally.held, budget, exceeded)
            tally.held = None
        rows.append((seconds, calls, attributes, tally.context))
        if exceeded:
            breaches.append((name, attributes, tally.context))
    return rows, breaches


tally_rows = _tally_rows if SPEEDUPS is None else SPEEDUPS.tally_rows


def _finish_span(
    span: Span,
    binding: _Binding,
    end_time_ns: int,
    exc: BaseException | None,
    budget: float | None,
    exceeded: bool,
    attributes: Mapping[str, Any] | None = None,
) -> None:
    """End any stage span: extra attributes, the budget verdict (only where a budget
    exists), the error, and the end time the monotonic duration implies."""
    if span.is_recording():
        if attributes:
            span.set_attributes(attributes)
        if budget is not None:
            span.set_attribute(semconv.INFERENCE_BUDGET, budget)
            span.set_attribute(semconv.INFERENCE_BUDGET_EXCEEDED, exceeded)
        if exc is not None:
            _mark_error(span, exc, binding.exception_messages)
    _end_span(span, end_time_ns)


def _frames(exc: BaseException) -> str:
    """The traceback's frames (file, line, function) without their source lines:
    formatting those would read every source file into linecache, on the
    request's error path."""
    return "".join(
        f'  File "{frame.f_code.co_filename}", line {lineno}, in {frame.f_code.co_name}\n'
        for frame, lineno in traceback.walk_tb(exc.__traceback__)
    )


def _mark_error(span: Span, exc: BaseException, with_message: bool) -> None:
    error_type = _error_type(exc)
    span.set_attribute(semconv.ERROR_TYPE, error_type)
    if with_message:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{error_type}: {exc}"))
        return
    # Exception messages often quote payload (KeyError('user:42'), a bad input
    # text): by default record the type and the frames, never the message.
    span.add_event(
        "exception",
        {
            EXCEPTION_TYPE: error_type,
            EXCEPTION_STACKTRACE: _frames(exc),
        },
    )
    span.set_status(Status(StatusCode.ERROR, error_type))


def _add_gc_pauses(span: Span, account: RequestAccount) -> None:
    span.set_attribute(semconv.INFERENCE_GC_PAUSE_DURATION, account.gc_pause_ns / 1e9)
    span.set_attribute(semconv.INFERENCE_GC_PAUSE_COUNT, account.gc_pause_count)
    for pause in account.gc_pauses:
        span.add_event(
            "gc.pause",
            {
                GC_GENERATION: pause.generation,
                "inference.gc.pause.duration": pause.duration_ns / 1e9,
                "inference.gc.collected": pause.collected,
            },
            timestamp=pause.end_wall_ns,
        )


class RequestScope(_Scope):
    """A request boundary. Records the request duration (stage ``request``) and the
    time no top-level stage covers (stage ``unattributed``) for every request."""

    __slots__ = (
        "_account",
        "_attributes",
        "_binding",
        "_context_token",
        "_frame_token",
        "_name",
        "_recorder",
        "_span",
        "_start_wall_ns",
    )

    def __enter__(self) -> RequestScope:
        self._span: Span | None = None
        self._context_token = None
        try:
            binding = self._recorder._binding or self._recorder._bind()
            self._binding = binding
            current = trace.get_current_span()
            parent_valid = current.get_span_context().is_valid
            cold = COLD_START.take_request()
            if current.is_recording() or not parent_valid:
                attributes = dict(self._attributes) if self._attributes else {}
                if cold:
                    attributes[semconv.INFERENCE_COLD_START] = True
                self._start_wall_ns = time_ns()
                span = binding.tracer.start_span(
                    self._name,
                    kind=SpanKind.INTERNAL if parent_valid else SpanKind.SERVER,
                    attributes=attributes,
                    start_time=self._start_wall_ns,
                )
                self._span = span
                self._context_token = otel_context.attach(trace.set_span_in_context(span))
            if _LOOP.started:
                _LOOP.observe()
            start_ns = perf_counter_ns()
            recording = self._span is not None and self._span.is_recording()
            self._account: RequestAccount = RequestAccount(self._name, start_ns, cold, recording)
            if _GC.started:
                _GC.in_flight[id(self._account)] = self._account
            self._frame_token: Token[_Frame | None] | None = _FRAME.set((self._account, None))
        except Exception:
            log_once("request-enter", "otel-inference: failed to open request", level=logging.ERROR)
            self._binding = None
            self._frame_token = None
            self._account = RequestAccount(self._name, perf_counter_ns())
        return self

    @property
    def account(self) -> RequestAccount:
        return self._account

    def set_attribute(self, key: str, value: Any) -> None:
        if self._span is not None:
            self._span.set_attribute(key, value)

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        end_ns = perf_counter_ns()
        binding = self._binding
        if binding is None:
            return False
        try:
            account = self._account
            _GC.in_flight.pop(id(account), None)
            duration_ns = end_ns - account.start_ns
            covered_ns = account.covered_ns(account.start_ns, end_ns)
            instrumentation_ns = account.instrumentation_ns()
            unattributed_ns = max(0, duration_ns - covered_ns - instrumentation_ns)
            if self._frame_token is not None:
                _FRAME.reset(self._frame_token)
            _close_account(binding, account, self._span)
            request_attributes = binding.metric_attributes(semconv.REQUEST, None, account.cold)
            if exc is not None:
                request_attributes = {**request_attributes, semconv.ERROR_TYPE: _error_type(exc)}
            budget = binding.budgets.get(semconv.REQUEST)
            exceeded = budget is not None and duration_ns / 1e9 > budget
            span = self._span
            if span is not None:
                if span.is_recording():
                    span.set_attribute(semconv.INFERENCE_UNATTRIBUTED, unattributed_ns / 1e9)
                    span.set_attribute(semconv.INFERENCE_INSTRUMENTATION, instrumentation_ns / 1e9)
                    if account.gc_pause_count:
                        _add_gc_pauses(span, account)
                    if _LOOP.started:
                        _LOOP.annotate(span, account.start_ns, end_ns)
                _finish_span(
                    span, binding, self._start_wall_ns + duration_ns, exc, budget, exceeded
                )
                otel_context.detach(self._context_token)
            binding.duration.record(duration_ns / 1e9, request_attributes)
            if exceeded:
                binding.breaches.add(1, request_attributes)
            unattributed_attributes = binding.metric_attributes(
                semconv.UNATTRIBUTED, None, account.cold
            )
            binding.duration.record(unattributed_ns / 1e9, unattributed_attributes)
            unattributed_budget = binding.budgets.get(semconv.UNATTRIBUTED)
            if unattributed_budget is not None and unattributed_ns / 1e9 > unattributed_budget:
                binding.breaches.add(1, unattributed_attributes)
            if _GC_PENDING:
                _drain_gc_pauses(binding)
        except Exception:
            log_once("request-exit", "otel-inference: failed to close request", level=logging.ERROR)
        return False


class AdoptedRequestScope:
    """A request whose span someone else owns (a web framework's SERVER span).

    Its stages are accounted per request (each recorded once, when it ends) and
    its GC pauses attributed, as under ``request()``; the ``request`` and
    ``unattributed`` stages are left to ``request()`` and the report. Nested in
    another request it does nothing. See :mod:`otel_inference.server_requests`.
    """

    __slots__ = ("_account", "_binding", "_frame_token", "_recorder")

    def __init__(self, recorder: StageRecorder) -> None:
        self._recorder = recorder
        self._account: RequestAccount | None = None
        self._frame_token: Token[_Frame | None] | None = None

    def __enter__(self) -> AdoptedRequestScope:
        try:
            if _FRAME.get() is not None:
                return self  # already inside a request (or a stage): it owns the account
            self._binding = self._recorder._binding or self._recorder._bind()
            span = trace.get_current_span()
            cold = COLD_START.active and COLD_START.take_trace(span.get_span_context().trace_id)
            account = self._account = RequestAccount(
                "server", perf_counter_ns(), cold, span.is_recording()
            )
            if _GC.started:
                _GC.in_flight[id(account)] = account
            if _LOOP.started:
                _LOOP.observe()
            self._frame_token = _FRAME.set((account, None))
        except Exception:
            log_once("adopt-enter", "otel-inference: failed to open request", level=logging.ERROR)
            self._account = None
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        account = self._account
        if account is None:
            return False
        try:
            _GC.in_flight.pop(id(account), None)
            if self._frame_token is not None:
                _FRAME.reset(self._frame_token)
            span = trace.get_current_span()
            _close_account(self._binding, account, span)
            if account.gc_pause_count and span.is_recording():
                _add_gc_pauses(span, account)
            if _LOOP.started and span.is_recording():
                _LOOP.annotate(span, account.start_ns, perf_counter_ns())
            if _GC_PENDING:
                _drain_gc_pauses(self._binding)
        except Exception:
            log_once("adopt-exit", "otel-inference: failed to close request", level=logging.ERROR)
        return False

    async def __aenter__(self) -> AdoptedRequestScope:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        return self.__exit__(exc_type, exc, tb)


class StageContext:
    """Where a stage belongs, captured by :meth:`StageRecorder.capture` in one
    context (a producer) for a stage recorded later from another (a consumer, a
    batcher). Holds references, not copies: keep it no longer than the work it
    describes."""

    __slots__ = ("account", "cold", "context", "parent", "recording", "span_context")

    def __init__(self, frame: _Frame | None, context: otel_context.Context, span: Span) -> None:
        self.account, self.parent = (None, None) if frame is None else frame
        self.context = context
        self.span_context: SpanContext = span.get_span_context()
        self.recording: bool = span.is_recording()
        # Judged as a stage opened here would be: a stage recorded later for a cold
        # request (its queue wait, its share of a batch) is cold too.
        if self.account is not None:
            self.cold: bool = self.account.cold
        else:
            self.cold = COLD_START.active and _cold_outside_request(self.parent, span)

    @property
    def in_request(self) -> bool:
        """True inside a ``request()`` or under a valid (sampled or not) span."""
        return self.account is not None or self.span_context.is_valid

    def cover(self, start_ns: int, end_ns: int) -> None:
        """Count ``[start_ns, end_ns]`` as covered time of the captured request, as
        a top-level stage does (nothing when captured inside a stage or outside a
        request). For callers that must cover before they can afford to record."""
        if self.account is not None and self.parent is None:
            self.account.add_interval(start_ns, end_ns)


def _cost_histogram(meter: metrics.Meter) -> metrics.Histogram:
    return meter.create_histogram(
        semconv.STAGE_COST,
        unit="s",
        description=(
            "Each request's share of a stage run once for a batch (duration / batch size): "
            "sums to the stage's real time, with no double counting"
        ),
        explicit_bucket_boundaries_advisory=DEFAULT_DURATION_BOUNDARIES,
    )


class BatchStageScope:
    """One execution of a stage shared by several requests (a batch forward).

    * Span: ONE span for the batch, child of the first member whose span is
      recording and linked to every member's span (so it appears once, in one
      member's trace, reachable from all); no span when no member is recording
      (a root span, per ``OTEL_INFERENCE_ROOT_STAGES``, only when no member has
      any span). ``inference.batch.size`` is set on it.
    * While open, it is the current span and the current stage, with no request:
      stages nested in the batch work get ``inference.stage.parent=<name>`` and
      cover no member's request, so sums over top-level stages stay exact.
    * ``record()``: for EVERY member, the ``inference.stage.duration`` histogram
      gets the whole duration (what that member experienced; label
      ``inference.stage.parent`` from the member's captured context), the budget
      check applies per member, ``inference.stage.cost`` gets ``duration / N``
      (N = number of members), and top-level members' requests are covered.
    """

    __slots__ = (
        "_attributes",
        "_binding",
        "_context_token",
        "_frame_token",
        "_members",
        "_name",
        "_recorder",
        "_span",
        "_start_ns",
        "_start_wall_ns",
    )

    def __init__(
        self,
        recorder: StageRecorder,
        name: str,
        members: Sequence[StageContext | None],
        attributes: Mapping[str, Any] | None,
    ) -> None:
        self._recorder = recorder
        self._name = name
        self._members = members
        self._attributes = attributes
        self._binding: _Binding | None = None
        self._span: Span | None = None
        self._context_token: object | None = None
        self._frame_token: Token[_Frame | None] | None = None
        self._start_ns = perf_counter_ns()
        self._start_wall_ns = 0

    def __enter__(self) -> BatchStageScope:
        try:
            binding = self._recorder._binding or self._recorder._bind()
            self._binding = binding
            parent: StageContext | None = None
            first_valid: SpanContext | None = None
            links: list[Link] = []
            for member in self._members:
                if member is None or not member.span_context.is_valid:
                    continue
                links.append(Link(member.span_context))
                if first_valid is None:
                    first_valid = member.span_context
                if parent is None and member.recording:
                    parent = member
            if parent is not None or (binding.root_spans and first_valid is None):
                attributes: dict[str, Any] = {
                    semconv.INFERENCE_STAGE: self._name,
                    semconv.INFERENCE_BATCH_SIZE: len(self._members),
                }
                if self._attributes:
                    attributes.update(self._attributes)
                self._start_wall_ns = time_ns()
                span = binding.tracer.start_span(
                    self._name,
                    context=None if parent is None else parent.context,
                    kind=SpanKind.INTERNAL,
                    attributes=attributes,
                    links=links,
                    start_time=self._start_wall_ns,
                )
                self._span = span
                self._context_token = otel_context.attach(trace.set_span_in_context(span))
            elif first_valid is not None:
                # Unsampled members: a valid non-recording parent keeps nested
                # stages on the cheap path instead of starting root spans.
                self._context_token = otel_context.attach(
                    trace.set_span_in_context(NonRecordingSpan(first_valid))
                )
            self._frame_token = _FRAME.set((None, self._name))
        except Exception:
            log_once(
                "batch-enter", "otel-inference: failed to open batch stage", level=logging.ERROR
            )
            self._binding = None
        self._start_ns = perf_counter_ns()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        duration_ns = perf_counter_ns() - self._start_ns
        self.exit_context()
        self.record(duration_ns, exc)
        return False

    def end(self, exc: BaseException | None = None) -> None:
        self.__exit__(None if exc is None else type(exc), exc, None)

    @property
    def start_ns(self) -> int:
        """``perf_counter_ns`` at which the batch stage started."""
        return self._start_ns

    @property
    def is_recording(self) -> bool:
        return self._span is not None and self._span.is_recording()

    @property
    def span_context(self) -> SpanContext | None:
        """The batch span's context when it is recording (for member spans to link to)."""
        span = self._span
        return span.get_span_context() if span is not None and span.is_recording() else None

    def set_attribute(self, key: str, value: Any) -> None:
        if self._span is not None:
            self._span.set_attribute(key, value)

    def exit_context(self) -> None:
        """Restore the caller's context; call in the context that opened the scope."""
        try:
            if self._frame_token is not None:
                _FRAME.reset(self._frame_token)
                self._frame_token = None
            if self._context_token is not None:
                otel_context.detach(self._context_token)  # type: ignore[arg-type]
                self._context_token = None
        except Exception:
            log_once(
                "batch-exit", "otel-inference: failed to close batch stage", level=logging.ERROR
            )

    def record(
        self,
        duration_ns: int,
        exc: BaseException | None = None,
        cover: bool = True,
        **span_attributes: Any,
    ) -> None:
        """End the span and record every member's figures (see the class docstring).
        ``cover=False`` when the caller covered the members' requests already."""
        binding = self._binding
        if binding is None:
            return
        try:
            name = self._name
            seconds = duration_ns / 1e9
            budget = binding.budgets.get(name)
            exceeded = budget is not None and seconds > budget
            span = self._span
            if span is not None:
                if _LOOP.started and span.is_recording():
                    _LOOP.annotate(span, self._start_ns, self._start_ns + duration_ns)
                _finish_span(
                    span,
                    binding,
                    self._start_wall_ns + duration_ns,
                    exc,
                    budget,
                    exceeded,
                    span_attributes,
                )
            members = self._members
            if not members:
                return
            share = seconds / len(members)
            cost = self._recorder.instruments(_cost_histogram)
            end_ns = self._start_ns + duration_ns
            error = None if exc is None else {semconv.ERROR_TYPE: _error_type(exc)}
            for member in members:
                if member is None:
                    continue
                attributes = binding.metric_attributes(name, member.parent, member.cold)
                if error is not None:
                    attributes = {**attributes, **error}
                binding.duration.record(seconds, attributes)
                cost.record(share, attributes)
                if exceeded:
                    binding.breaches.add(1, attributes)
                if cover:
                    member.cover(self._start_ns, end_ns)
        except Exception:
            log_once(
                "batch-record", "otel-inference: failed to record batch stage", level=logging.ERROR
            )


_default_recorder = StageRecorder()


def get_recorder() -> StageRecorder:
    """The process-wide recorder behind :func:`stage` and :func:`request`."""
    return _default_recorder


def stage(name: str, **attributes: Any) -> StageScope:
    """Time a stage: ``with stage("tokenize"):``, ``async with``, or ``@stage("tokenize")``.

    ``attributes`` go on the stage's span (when sampled), never on the histogram.
    """
    return StageScope(_default_recorder, name, attributes)


def request(name: str = "inference.request", **attributes: Any) -> RequestScope:
    """Mark a request boundary when no web framework span does (or to get
    ``request``/``unattributed`` figures for every request)."""
    return RequestScope(_default_recorder, name, attributes)


def configure(
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    budgets: Mapping[str, object] | str | None = None,
    root_stages: str | None = None,
) -> None:
    """Configure the default recorder. Raises :class:`ConfigurationError` on bad input.

    ``budgets`` given here replace the environment's; ``None`` reads them from
    ``OTEL_INFERENCE_BUDGETS`` / ``OTEL_INFERENCE_BUDGETS_FILE``.
    """
    _default_recorder.configure(tracer_provider, meter_provider, budgets, root_stages)
