"""The recording fast path: our histograms and counters aggregated in-process, exported
through the SDK's own readers.

The SDK's ``Histogram.record`` costs ~10 us (attribute cleaning and hashing, a
``Measurement`` object, the exemplar filter, locks); a stage needs a bucket
increment. When the otel-inference configurator builds the meter provider (under
``opentelemetry-instrument``), the instruments of the ``otel_inference`` meter
(``inference.stage.duration``, ``.calls``, ``.budget.breaches``, ``.cost``, the
instrumentors' counters and histograms) are :class:`FastHistogram` /
:class:`FastCounter`: a dict lookup by the caller's cached attribute dict, a
``bisect`` and a few increments. At collection time each reader, built by us from
``OTEL_METRICS_EXPORTER`` (a ``PeriodicExportingMetricReader`` subclass for
``otlp``/``console``, a ``PrometheusMetricReader`` subclass for ``prometheus``),
merges our points into the SDK's ``MetricsData`` in ``_receive_metrics``, the method
the SDK documents for subclasses, before the standard export. Same names, units,
boundaries, temporality (per reader), exemplars (one per bucket, trace-based
filter), cardinality limit (2000 series, then ``otel.metric.overflow``).

Anywhere else (a programmatic ``configure(meter_provider=...)``, a test's
``InMemoryMetricReader``) the SDK records as before, said in one log line.

Usage (what :class:`otel_inference.distro.OtelInferenceConfigurator` does)::

    provider = build_meter_provider(resource, ["otlp"])  # None: not possible, SDK path
    if provider is not None:
        metrics.set_meter_provider(provider)

See docs/recording-fast-path.md.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib.metadata import entry_points
from math import inf
from random import randrange
from time import time_ns
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context, get_current
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION,
    OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE,
    OTEL_METRICS_EXEMPLAR_FILTER,
)
from opentelemetry.sdk.metrics import Counter as SdkCounter
from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import INVALID_SPAN

from otel_inference._compiled import SPEEDUPS

_logger = logging.getLogger(__name__)

CARDINALITY_LIMIT = 2000
"""Series per instrument and reader before ``otel.metric.overflow``: the SDK's default."""
_OVERFLOW = {"otel.metric.overflow": True}
_MAX_CACHED_IDS = 1024
# Exporters whose temporality we set (and so know) when we build them.
_OTLP_EXPORTERS = ("otlp", "otlp_proto_grpc", "otlp_proto_http")
_KNOWN_EXPORTERS = (*_OTLP_EXPORTERS, "console")
# Pull readers (cumulative): the exporter's own entry point, and ours, which the
# configurator puts in its place (otel_inference.prometheus: a busy port is one line).
_PROMETHEUS_READERS = ("prometheus", "otel_inference_prometheus")
_CARRIER_SCOPE = "otel_inference.fastpath"

_CUMULATIVE = AggregationTemporality.CUMULATIVE
_DELTA = AggregationTemporality.DELTA


def _log_once(key: str, message: str, *args: object, level: int = logging.INFO) -> None:
    from otel_inference.stages import log_once  # stages imports this module

    log_once(key, message, *args, level=level, exc_info=level >= logging.ERROR)


def _exemplar_filter() -> str:
    """``OTEL_METRICS_EXEMPLAR_FILTER`` as the SDK's meter provider reads it."""
    value = os.environ.get(OTEL_METRICS_EXEMPLAR_FILTER, "trace_based")
    return value if value in ("trace_based", "always_on", "always_off") else "trace_based"


# (context, filter, verdict) of the latest exemplar decision; one list, replaced whole
_last_verdict: list[Any] = [None, None, None]


class _Figures:
    """A histogram's or a counter's figures for one attribute set (a counter uses
    ``sum`` and ``exemplars`` only)."""

    __slots__ = ("attributes", "count", "counts", "exemplars", "max", "min", "sum")

    def __init__(self, attributes: dict[str, Any], buckets: int) -> None:
        self.attributes = attributes
        self.counts = [0] * buckets
        self.count = 0
        self.sum: float = 0
        self.min: float = inf
        self.max: float = -inf
        # Histograms: one exemplar per bucket, the latest; counters: one, reservoir-sampled.
        self.exemplars: dict[int, tuple] = {}


class _Series(_Figures):
    """One attribute set of one instrument: its figures since the last collection."""

    __slots__ = ("first_ns", "seen")

    def __init__(self, attributes: Mapping[str, Any] | None, buckets: int) -> None:
        super().__init__(dict(attributes) if attributes else {}, buckets)
        self.seen = 0  # measurements offered to the counter's reservoir this cycle
        self.first_ns = time_ns()


def _key(attributes: Mapping[str, Any] | None) -> frozenset:
    if not attributes:
        return frozenset()
    try:
        return frozenset(attributes.items())
    except TypeError:  # a list value: key it as a tuple, as the SDK hashes it
        return frozenset((k, tuple(v) if isinstance(v, list) else v) for k, v in attributes.items())


def _negative(instrument: _FastInstrument) -> None:
    _log_once("fast-negative", "otel-inference: negative record on %s dropped", instrument.name)


def _record_rows(
    histogram: FastHistogram,
    other: FastHistogram,
    rows: Iterable[tuple[float, float, Mapping[str, Any] | None, Context | None]],
    filtered: bool,
    pair_of: Callable[[FastHistogram, Mapping[str, Any] | None], tuple[Any, Any, Any, Any]],
    negative: Callable[[_FastInstrument], None],
) -> None:
    """The loop of :meth:`FastHistogram.record_pairs`, both locks held: ``rows`` into
    ``histogram`` and ``other``, their series found in one lookup (``pair_of`` on a
    miss), the exemplar filter judged once per distinct context. Compiled
    (``_speedups.record_rows``) when built: it runs once per stage of every request."""
    judged: Any = _last_verdict  # a context no row has: the first row is judged
    span = None
    pairs = histogram._pairs
    boundaries, other_boundaries = histogram.boundaries, other.boundaries
    for amount, other_amount, attributes, context in rows:
        pair = pairs.get(id(attributes))
        if pair is None or pair[0] is not attributes or pair[1] is not other:
            pair = pair_of(other, attributes)
        if filtered and context is not judged:
            judged = context
            span = histogram._sampled(context)
        when = None if span is None else time_ns()
        if amount < 0:  # as the SDK's histogram (and record()): dropped
            negative(histogram)
        else:
            _add_to_series(pair[2], boundaries, amount, when, span, attributes)
        if other_amount < 0:
            negative(other)
        else:
            _add_to_series(pair[3], other_boundaries, other_amount, when, span, attributes)


def _add_to_series(
    series: _Series,
    boundaries: Sequence[float],
    amount: float,
    when: int | None,
    span: Any,
    attributes: Mapping[str, Any] | None,
) -> None:
    """One value into a histogram series (its lock held): the bucket, sum, min, max,
    and the bucket's exemplar when ``when`` is set."""
    index = bisect_left(boundaries, amount)
    series.counts[index] += 1
    series.sum += amount
    if amount < series.min:
        series.min = amount
    if amount > series.max:
        series.max = amount
    series.count = 1  # has figures (the count is the buckets' sum)
    if when is not None:
        series.exemplars[index] = (amount, when, span, attributes)  # the latest per bucket


class _FastInstrument:
    __slots__ = (
        "_buckets",
        "_by_id",
        "_exemplars",
        "_lock",
        "_series",
        "description",
        "name",
        "scope",
        "unit",
    )

    def __init__(
        self,
        name: str,
        unit: str,
        description: str,
        scope: InstrumentationScope,
        buckets: int,
        exemplars: str,
    ) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self.scope = scope
        self._buckets = buckets
        self._lock = threading.Lock()
        self._series: dict[frozenset, _Series] = {}
        # id(attributes dict) -> (that dict, its series): the callers reuse cached dicts
        self._by_id: dict[int, tuple[Mapping[str, Any] | None, _Series]] = {}
        self._exemplars = None if exemplars == "always_off" else exemplars == "trace_based"

    def _series_for(self, attributes: Mapping[str, Any] | None) -> _Series:
        with self._lock:
            return self._series_locked(attributes)

    def _series_locked(self, attributes: Mapping[str, Any] | None) -> _Series:
        """:meth:`_series_for` with ``_lock`` held."""
        key = _key(attributes)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(attributes, self._buckets)
        if len(self._by_id) < _MAX_CACHED_IDS:
            self._by_id[id(attributes)] = (attributes, series)
        return series

    def _sampled(self, context: Context | None) -> Any:
        """The span an exemplar points to, or None: the SDK's exemplar filter, judged
        on ``context`` or the current context. Records at a request's end share one
        context: its verdict is cached by identity."""
        if context is None:
            context = get_current()
        last = _last_verdict
        if last[0] is context and last[1] is self._exemplars:
            return last[2]
        span = trace.get_current_span(context)
        if self._exemplars and (  # trace_based
            span is INVALID_SPAN or not span.get_span_context().trace_flags.sampled
        ):
            span = None
        _last_verdict[:] = (context, self._exemplars, span)
        return span

    def drain(self) -> list[tuple[frozenset, _Series, list[int], int, float, float, float, dict]]:
        """The figures since the last drain (series with any), reset to zero."""
        drained = []
        with self._lock:
            for key, series in self._series.items():
                if not series.count:
                    continue
                drained.append(
                    (
                        key,
                        series,
                        series.counts,
                        series.count,
                        series.sum,
                        series.min,
                        series.max,
                        series.exemplars,
                    )
                )
                series.counts = [0] * self._buckets
                series.count = 0
                series.sum = 0
                series.min, series.max = inf, -inf
                series.exemplars = {}
                series.seen = 0
        return drained

    def reset(self) -> None:
        self._lock = threading.Lock()
        self._series = {}
        self._by_id = {}


class FastHistogram(_FastInstrument):
    """An explicit-bucket histogram with the SDK histogram's ``record`` signature.

    Series are found by the identity of the ``attributes`` dict first (the recorder
    hands the same cached dict for a stage every time): a dict must not be changed
    after it was recorded with; otel-inference's never are."""

    __slots__ = ("_pairs", "boundaries")

    def __init__(
        self,
        name: str,
        unit: str,
        description: str,
        scope: InstrumentationScope,
        boundaries: Sequence[float],
        exemplars: str,
    ) -> None:
        super().__init__(name, unit, description, scope, len(boundaries) + 1, exemplars)
        self.boundaries = tuple(boundaries)
        # record_pairs: id(attributes) -> (attributes, other, its series here, there)
        self._pairs: dict[int, tuple[Any, FastHistogram, _Series, _Series]] = {}

    def record(
        self,
        amount: float,
        attributes: Mapping[str, Any] | None = None,
        context: Context | None = None,
    ) -> None:
        try:
            cached = self._by_id.get(id(attributes))
            series = (
                cached[1]
                if cached is not None and cached[0] is attributes
                else self._series_for(attributes)
            )
            if amount < 0:  # as the SDK's histogram: dropped
                _negative(self)
                return
            span = None if self._exemplars is None else self._sampled(context)
            when = None if span is None else time_ns()
            with self._lock:
                _add_to_series(series, self.boundaries, amount, when, span, attributes)
        except Exception:
            _log_once(
                "fast-record", "otel-inference: failed to record %s", self.name, level=logging.ERROR
            )

    def record_pairs(
        self,
        other: FastHistogram,
        rows: Iterable[tuple[float, float, Mapping[str, Any] | None, Context | None]],
    ) -> None:
        """For each ``(amount, other_amount, attributes, context)`` row,
        ``self.record(amount, attributes, context)`` and
        ``other.record(other_amount, attributes, context)``: the same figures and
        exemplars, with each instrument's lock taken once for all rows, both series
        found in one lookup, and the exemplar filter judged once per distinct
        context (a request's end records two histograms per stage, under one or a
        few contexts)."""
        if other._exemplars is not self._exemplars or other._lock is self._lock:
            for amount, other_amount, attributes, context in rows:
                self.record(amount, attributes, context)
                other.record(other_amount, attributes, context)
            return
        try:
            with self._lock, other._lock:
                record_rows(
                    self, other, rows, self._exemplars is not None, self._pair_locked, _negative
                )
        except Exception:
            _log_once(
                "fast-record", "otel-inference: failed to record %s", self.name, level=logging.ERROR
            )

    def _pair_locked(
        self, other: FastHistogram, attributes: Mapping[str, Any] | None
    ) -> tuple[Any, FastHistogram, _Series, _Series]:
        """The series of ``attributes`` here and in ``other`` (both locks held), kept
        for the next :meth:`record_pairs` by the dict's identity, as ``record`` does.
        Both instruments' series live until both are reset (the aggregator resets
        all its instruments at once)."""
        pair = (
            attributes,
            other,
            self._series_locked(attributes),
            other._series_locked(attributes),
        )
        if len(self._pairs) < _MAX_CACHED_IDS:
            self._pairs[id(attributes)] = pair
        return pair

    def reset(self) -> None:
        super().reset()
        self._pairs = {}


if SPEEDUPS is not None:
    SPEEDUPS.bind_series(_Series)
    record_rows = SPEEDUPS.record_rows
else:
    record_rows = _record_rows


class FastCounter(_FastInstrument):
    """A monotonic sum with the SDK counter's ``add`` signature."""

    __slots__ = ()

    def __init__(
        self, name: str, unit: str, description: str, scope: InstrumentationScope, exemplars: str
    ) -> None:
        super().__init__(name, unit, description, scope, 1, exemplars)

    def add(
        self,
        amount: float,
        attributes: Mapping[str, Any] | None = None,
        context: Context | None = None,
    ) -> None:
        try:
            if amount < 0:
                _log_once(
                    "fast-negative", "otel-inference: negative add to counter %s dropped", self.name
                )
                return
            cached = self._by_id.get(id(attributes))
            series = (
                cached[1]
                if cached is not None and cached[0] is attributes
                else self._series_for(attributes)
            )
            with self._lock:
                series.count += 1
                series.sum += amount
            if self._exemplars is not None:
                span = self._sampled(context)
                if span is not None:
                    exemplar = (amount, time_ns(), span, attributes)
                    with self._lock:
                        # the SDK's SimpleFixedSizeExemplarReservoir of size 1
                        series.seen += 1
                        if series.seen == 1 or randrange(0, series.seen) == 0:
                            series.exemplars[0] = exemplar
        except Exception:
            _log_once(
                "fast-record", "otel-inference: failed to record %s", self.name, level=logging.ERROR
            )


def _exemplars(stored: dict[int, tuple]) -> list[Exemplar]:
    exemplars = []
    for index in sorted(stored):
        value, when, span, attributes = stored[index]
        span_id = trace_id = None
        if span is not INVALID_SPAN:
            span_context = span.get_span_context()
            span_id, trace_id = span_context.span_id, span_context.trace_id
        # the measurement's attributes not already on the point: none
        exemplars.append(Exemplar({} if attributes else None, value, when, span_id, trace_id))
    return exemplars


class _Accumulated(_Figures):
    """One series as one reader will export it."""

    __slots__ = ("start_ns",)

    def __init__(self, attributes: dict[str, Any], buckets: int, start_ns: int) -> None:
        super().__init__(attributes, buckets)
        self.start_ns = start_ns


class _ReaderState:
    """What one reader has not exported yet (delta) or ever (cumulative), per instrument."""

    def __init__(
        self, histograms: AggregationTemporality, counters: AggregationTemporality
    ) -> None:
        self.temporality = {FastHistogram: histograms, FastCounter: counters}
        self.series: dict[str, dict[frozenset, _Accumulated]] = {}
        self.last_collect_ns: int | None = None

    def fold(self, instrument: _FastInstrument, drained: list) -> None:
        table = self.series.setdefault(instrument.name, {})
        delta = self.temporality[type(instrument)] is _DELTA
        for key, series, counts, count, sum_, min_, max_, exemplars in drained:
            entry = table.get(key)
            if entry is None:
                if len(table) >= CARDINALITY_LIMIT:
                    key = frozenset(_OVERFLOW.items())
                    entry = table.get(key)
                if entry is None:
                    start = (
                        self.last_collect_ns if delta and self.last_collect_ns else series.first_ns
                    )
                    attributes = (
                        dict(_OVERFLOW)
                        if key == frozenset(_OVERFLOW.items())
                        else series.attributes
                    )
                    entry = table[key] = _Accumulated(attributes, len(counts), start)
            entry.counts = [a + b for a, b in zip(entry.counts, counts, strict=True)]
            entry.count += count
            entry.sum += sum_
            entry.min = min(entry.min, min_)
            entry.max = max(entry.max, max_)
            entry.exemplars.update(exemplars)

    def export(
        self, instruments: Iterable[_FastInstrument], now_ns: int
    ) -> dict[InstrumentationScope, list[Metric]]:
        by_scope: dict[InstrumentationScope, list[Metric]] = {}
        for instrument in instruments:
            table = self.series.get(instrument.name)
            if not table:
                continue
            temporality = self.temporality[type(instrument)]
            points = []
            for entry in table.values():
                if isinstance(instrument, FastHistogram):
                    points.append(
                        HistogramDataPoint(
                            attributes=entry.attributes,
                            start_time_unix_nano=entry.start_ns,
                            time_unix_nano=now_ns,
                            count=sum(entry.counts),
                            sum=entry.sum,
                            bucket_counts=tuple(entry.counts),
                            explicit_bounds=instrument.boundaries,
                            min=entry.min,
                            max=entry.max,
                            exemplars=_exemplars(entry.exemplars),
                        )
                    )
                else:
                    points.append(
                        NumberDataPoint(
                            attributes=entry.attributes,
                            start_time_unix_nano=entry.start_ns,
                            time_unix_nano=now_ns,
                            value=entry.sum,
                            exemplars=_exemplars(entry.exemplars),
                        )
                    )
                entry.exemplars = {}  # exemplars are per collection cycle, as the SDK's
            if temporality is _DELTA:
                table.clear()
            data: Any = (
                Histogram(data_points=points, aggregation_temporality=temporality)
                if isinstance(instrument, FastHistogram)
                else Sum(data_points=points, aggregation_temporality=temporality, is_monotonic=True)
            )
            by_scope.setdefault(instrument.scope, []).append(
                Metric(
                    name=instrument.name,
                    description=instrument.description,
                    unit=instrument.unit,
                    data=data,
                )
            )
        self.last_collect_ns = now_ns
        return by_scope


class Aggregator:
    """The fast instruments of one meter provider and the state of each of its readers."""

    def __init__(self, resource: Resource) -> None:
        self.resource = resource
        self.exemplar_filter = _exemplar_filter()
        self._lock = threading.Lock()
        self._instruments: dict[str, _FastInstrument] = {}
        self._readers: weakref.WeakKeyDictionary[MetricReader, _ReaderState] = (
            weakref.WeakKeyDictionary()
        )

    def add_reader(
        self,
        reader: MetricReader,
        histograms: AggregationTemporality,
        counters: AggregationTemporality,
    ) -> None:
        self._readers[reader] = _ReaderState(histograms, counters)

    def histogram(
        self,
        scope: InstrumentationScope,
        name: str,
        unit: str,
        description: str,
        boundaries: Sequence[float],
    ) -> FastHistogram:
        with self._lock:
            existing = self._instruments.get(name)
            if isinstance(existing, FastHistogram):
                return existing
            created = FastHistogram(
                name, unit, description, scope, boundaries, self.exemplar_filter
            )
            self._instruments[name] = created
            return created

    def counter(
        self, scope: InstrumentationScope, name: str, unit: str, description: str
    ) -> FastCounter:
        with self._lock:
            existing = self._instruments.get(name)
            if isinstance(existing, FastCounter):
                return existing
            created = FastCounter(name, unit, description, scope, self.exemplar_filter)
            self._instruments[name] = created
            return created

    def merge(self, reader: MetricReader, metrics_data: MetricsData) -> MetricsData:
        """``metrics_data`` (the SDK's collection for ``reader``) with our points in it,
        and without the carrier gauge."""
        with self._lock:
            instruments = list(self._instruments.values())
            states = list(self._readers.values())
            for instrument in instruments:
                drained = instrument.drain()
                if drained:
                    for state in states:  # every reader aggregates every measurement
                        state.fold(instrument, drained)
            state = self._readers.get(reader)
            ours = {} if state is None else state.export(instruments, time_ns())
        resource_metrics = list(metrics_data.resource_metrics) or [
            ResourceMetrics(
                resource=self.resource, scope_metrics=[], schema_url=self.resource.schema_url
            )
        ]
        first = resource_metrics[0]
        scope_metrics = []
        for scoped in first.scope_metrics:
            if scoped.scope.name == _CARRIER_SCOPE:
                continue
            extra = ours.pop(scoped.scope, None)
            if extra:
                scoped = ScopeMetrics(
                    scope=scoped.scope,
                    metrics=[*scoped.metrics, *extra],
                    schema_url=scoped.schema_url,
                )
            scope_metrics.append(scoped)
        for scope, extra in ours.items():
            scope_metrics.append(
                ScopeMetrics(scope=scope, metrics=extra, schema_url=scope.schema_url or "")
            )
        resource_metrics[0] = ResourceMetrics(
            resource=first.resource, scope_metrics=scope_metrics, schema_url=first.schema_url
        )
        return MetricsData(resource_metrics=resource_metrics)

    def reset(self) -> None:
        """In a forked child: the parent's figures are the parent's to export."""
        self._lock = threading.Lock()
        for instrument in self._instruments.values():
            instrument.reset()
        for state in self._readers.values():
            state.series.clear()


class FastMeter:
    """A meter whose counters and explicit-bucket histograms are fast; every other
    instrument (and a histogram without bucket advice) is the SDK meter's."""

    def __init__(self, meter: Meter, aggregator: Aggregator) -> None:
        self._meter = meter
        self._aggregator = aggregator
        self._scope = InstrumentationScope(meter.name, meter.version, meter.schema_url)

    def create_histogram(
        self,
        name: str,
        unit: str = "",
        description: str = "",
        *,
        explicit_bucket_boundaries_advisory: Sequence[float] | None = None,
    ) -> Any:
        if explicit_bucket_boundaries_advisory is None:
            return self._meter.create_histogram(name, unit=unit, description=description)
        return self._aggregator.histogram(
            self._scope, name, unit, description, explicit_bucket_boundaries_advisory
        )

    def create_counter(self, name: str, unit: str = "", description: str = "") -> FastCounter:
        return self._aggregator.counter(self._scope, name, unit, description)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._meter, name)


_aggregators: weakref.WeakKeyDictionary[MeterProvider, Aggregator] = weakref.WeakKeyDictionary()


def fast_meter(meter: Meter, meter_provider: MeterProvider | None) -> Meter | FastMeter:
    """``meter`` itself, or its fast facade when ``meter_provider`` (``None``: the
    global one) was built by :func:`build_meter_provider`."""
    from opentelemetry import metrics

    provider = metrics.get_meter_provider() if meter_provider is None else meter_provider
    try:
        aggregator = _aggregators.get(provider)
    except TypeError:
        aggregator = None
    if aggregator is None:
        _log_once(
            "fast-path-off",
            "otel-inference: stage metrics are recorded through the SDK (the meter provider "
            "%s was not built by the otel-inference configurator): see docs/recording-fast-path.md",
            type(provider).__name__,
        )
        return meter
    return FastMeter(meter, aggregator)


class _FastPathReader:
    """Mixin: our points join the SDK's collection in ``_receive_metrics``."""

    _otel_inference_aggregator: Aggregator | None = None

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        aggregator = self._otel_inference_aggregator
        if aggregator is not None and metrics_data is not None:
            try:
                metrics_data = aggregator.merge(self, metrics_data)  # type: ignore[arg-type]
            except Exception:
                _log_once(
                    "fast-merge",
                    "otel-inference: failed to merge stage metrics",
                    level=logging.ERROR,
                )
        super()._receive_metrics(metrics_data, timeout_millis=timeout_millis, **kwargs)  # type: ignore[misc]


class FastPeriodicExportingMetricReader(_FastPathReader, PeriodicExportingMetricReader):
    """``PeriodicExportingMetricReader`` exporting our points too."""


def fast_reader_class(cls: type[MetricReader]) -> type[MetricReader]:
    """``cls`` (a reader class, e.g. ``PrometheusMetricReader``) exporting our points too."""
    return type(f"FastPath{cls.__name__}", (_FastPathReader, cls), {})


def otlp_temporality(environ: Mapping[str, str] = os.environ) -> AggregationTemporality:
    """Counters' and histograms' temporality under
    ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`` (as the OTLP exporters read it)."""
    value = (
        environ.get(OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE, "CUMULATIVE").upper().strip()
    )
    return _DELTA if value in ("DELTA", "LOWMEMORY") else _CUMULATIVE


def _carrier(_options: CallbackOptions) -> list[Observation]:
    # Our points ride on the SDK's collection, which skips _receive_metrics when the
    # SDK itself has nothing: this gauge, removed again in merge(), makes sure it has.
    return [Observation(1)]


def attach_reader(
    aggregator: Aggregator,
    reader: MetricReader,
    histograms: AggregationTemporality,
    counters: AggregationTemporality,
) -> None:
    """Make ``reader`` (a :class:`_FastPathReader`) export ``aggregator``'s points."""
    reader._otel_inference_aggregator = aggregator  # type: ignore[attr-defined]
    aggregator.add_reader(reader, histograms, counters)


def new_provider(
    resource: Resource,
    readers: Sequence[tuple[MetricReader, AggregationTemporality, AggregationTemporality]],
) -> SdkMeterProvider:
    """A meter provider whose readers (``_FastPathReader`` subclasses, with each one's
    counter and histogram temporality) export the fast instruments."""
    aggregator = Aggregator(resource)
    for reader, histograms, counters in readers:
        attach_reader(aggregator, reader, histograms, counters)
    provider = SdkMeterProvider(resource=resource, metric_readers=[r for r, _, _ in readers])
    provider.get_meter(_CARRIER_SCOPE).create_observable_gauge(
        "otel_inference.fastpath.carrier", callbacks=[_carrier]
    )
    _aggregators[provider] = aggregator
    return provider


def build_meter_provider(
    resource: Resource, exporter_names: Sequence[str]
) -> SdkMeterProvider | None:
    """The meter provider for ``OTEL_METRICS_EXPORTER=exporter_names``, its readers
    built by us from the ``opentelemetry_metrics_exporter`` entry points; ``None``
    (logged once) when one of them is not one we know the temporality of."""
    aggregation = os.environ.get(OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION, "")
    if aggregation.strip().lower() not in ("", "explicit_bucket_histogram") and any(
        name in _OTLP_EXPORTERS for name in exporter_names
    ):
        # The OTLP exporter would ask the SDK for exponential histograms: not ours to mimic.
        _log_once(
            "fast-path-exporter",
            "otel-inference: %s=%s: stage metrics are recorded through the SDK",
            OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION,
            aggregation,
        )
        return None
    group = entry_points(group="opentelemetry_metrics_exporter")
    classes = []
    for name in exporter_names:
        found = [ep for ep in group if ep.name == name]
        if not found or (name not in _KNOWN_EXPORTERS and name not in _PROMETHEUS_READERS):
            _log_once(
                "fast-path-exporter",
                "otel-inference: metrics exporter %r: stage metrics are recorded through the SDK",
                name,
            )
            return None
        classes.append((name, found[0].load()))
    readers = []
    for name, cls in classes:
        if isinstance(cls, type) and issubclass(cls, MetricReader):
            readers.append(
                (fast_reader_class(cls)(), _CUMULATIVE, _CUMULATIVE)
            )  # Prometheus: cumulative
            continue
        temporality = otlp_temporality() if name in _OTLP_EXPORTERS else _CUMULATIVE
        exporter = cls(preferred_temporality={SdkCounter: temporality, SdkHistogram: temporality})
        readers.append((FastPeriodicExportingMetricReader(exporter), temporality, temporality))
    return new_provider(resource, readers)


def _reset_in_child() -> None:
    for aggregator in list(_aggregators.values()):
        aggregator.reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)


__all__ = [
    "CARDINALITY_LIMIT",
    "Aggregator",
    "FastCounter",
    "FastHistogram",
    "FastMeter",
    "FastPeriodicExportingMetricReader",
    "build_meter_provider",
    "fast_meter",
    "fast_reader_class",
    "new_provider",
    "otlp_temporality",
]
