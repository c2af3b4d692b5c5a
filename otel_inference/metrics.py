"""Instrument definitions and histogram bucket boundaries.

The stage duration histogram uses boundaries fine enough for 0.1 ms .. 60 s
(steps of at most 1.5x) and always includes every configured budget exactly:
with interpolation between coarse buckets, a p95 that sits under its budget can
read as a breach (values all <= 16 ms read as 23 ms with 10/25 ms buckets).
They reach the SDK through ``explicit_bucket_boundaries_advisory``, so no View
is needed; a user's View still wins.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from opentelemetry.metrics import Counter, Histogram, Meter

from otel_inference import semconv

_STEPS = ("1", "1.5", "2", "3", "4", "5", "7.5")


def _default_boundaries() -> tuple[float, ...]:
    values = [
        float(Decimal(step) * Decimal(10) ** exponent)
        for exponent in range(-4, 2)
        for step in _STEPS
    ]
    return (*[v for v in values if v < 60.0], 60.0)


DEFAULT_DURATION_BOUNDARIES: tuple[float, ...] = _default_boundaries()
"""0.0001 s .. 60 s: 1, 1.5, 2, 3, 4, 5, 7.5 per decade."""


def duration_boundaries(budgets: Iterable[float] = ()) -> tuple[float, ...]:
    """Default boundaries plus every budget value, sorted and de-duplicated."""
    return tuple(sorted(set(DEFAULT_DURATION_BOUNDARIES).union(budgets)))


CALLS_BOUNDARIES: tuple[float, ...] = (1, 2, 3, 4, 5, 10, 20, 50, 100, 200, 500, 1000)
"""Calls of one stage per request: 1 is its own bucket, so N+1 patterns stand out."""


def create_call_duration_histogram(meter: Meter) -> Histogram:
    """The opt-in per-call histogram (:envvar:`OTEL_INFERENCE_STAGE_CALL_DURATION`)."""
    return meter.create_histogram(
        semconv.STAGE_CALL_DURATION,
        unit="s",
        description="Duration of every single call of a stage (opt-in)",
        explicit_bucket_boundaries_advisory=DEFAULT_DURATION_BOUNDARIES,
    )


@dataclass(frozen=True)
class StageInstruments:
    """The instruments every stage records into."""

    duration: Histogram
    breaches: Counter
    calls: Histogram
    boundaries: tuple[float, ...]


def create_stage_instruments(meter: Meter, budgets: Iterable[float] = ()) -> StageInstruments:
    boundaries = duration_boundaries(budgets)
    return StageInstruments(
        duration=meter.create_histogram(
            semconv.STAGE_DURATION,
            unit="s",
            description=(
                "Time one request spent in one stage: the union of its calls, inclusive "
                "of nested stages (outside a request: one call)"
            ),
            explicit_bucket_boundaries_advisory=boundaries,
        ),
        breaches=meter.create_counter(
            semconv.STAGE_BUDGET_BREACHES,
            unit="{breach}",
            description=(
                "Requests whose time in the stage broke its budget (outside a request: "
                "single stage calls over budget)"
            ),
        ),
        calls=meter.create_histogram(
            semconv.STAGE_CALLS,
            unit="{call}",
            description="Calls of the stage one request made (N+1 patterns show here)",
            explicit_bucket_boundaries_advisory=CALLS_BOUNDARIES,
        ),
        boundaries=boundaries,
    )
