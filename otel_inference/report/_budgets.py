"""Budgets for the report: learnt from the telemetry, overridden by the user.

The service records each budget where it judges it: a stage span over its
budget carries ``inference.budget.exceeded``, and ``inference.budget`` (the
budget in seconds) on every span of a stage that has one (the ``request()``
span for the ``request`` budget); Prometheus has the
``inference_stage_budget_seconds`` gauge. The report uses, per stage, the
first of: the budgets given explicitly (``--budgets``), the telemetry's, the
report's own environment (``OTEL_INFERENCE_BUDGETS``). Telemetry that holds
several values for one stage (replicas or restarts with other settings) is
reported in a note; the most frequent value is used (ties: the smallest).

Usage::

    from otel_inference.report._budgets import choose_budgets, learnt_budgets

    learnt, notes = learnt_budgets({"tokenize": [0.005, 0.005]}, what="span")
    chosen = choose_budgets(explicit={}, telemetry=learnt, environment={}, notes=notes)
    chosen["tokenize"]  # (0.005, "telemetry")
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

EXPLICIT = "explicit"
TELEMETRY = "telemetry"
ENVIRONMENT = "environment"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:g} ms"


def learnt_budgets(
    values: Mapping[str, Iterable[float]], *, what: str
) -> tuple[dict[str, float], list[str]]:
    """One budget per stage from every value a ``what`` (``span``, ``series``) holds,
    and a note for each stage whose values disagree."""
    budgets: dict[str, float] = {}
    notes: list[str] = []
    for stage in sorted(values):
        counts = Counter(values[stage])
        if not counts:
            continue
        chosen = min(counts, key=lambda v: (-counts[v], v))
        budgets[stage] = chosen
        if len(counts) > 1:
            tie = sorted(counts.values())[-2] == counts[chosen]
            listed = ", ".join(
                f"{_ms(v)} ({counts[v]} {what if counts[v] == 1 or what.endswith('s') else what + 's'})"
                for v in sorted(counts, key=lambda v: (-counts[v], v))
            )
            notes.append(
                f"budgets disagree for {stage} in the telemetry: {listed}; using "
                f"{_ms(chosen)}, the most frequent{' (a tie: the smallest)' if tie else ''} "
                "(--budgets chooses)"
            )
    return budgets, notes


def choose_budgets(
    *,
    explicit: Mapping[str, float] | None,
    telemetry: Mapping[str, float],
    environment: Mapping[str, float] | None,
    notes: list[str],
) -> dict[str, tuple[float, str]]:
    """stage -> (seconds, source): explicit over telemetry over environment; a note
    when an explicit or environment budget differs from the telemetry's."""
    chosen: dict[str, tuple[float, str]] = {
        stage: (value, ENVIRONMENT) for stage, value in (environment or {}).items()
    }
    for stage, value in telemetry.items():
        previous = chosen.get(stage)
        if previous is not None and previous[0] != value:
            notes.append(
                f"{stage}: budget {_ms(value)} from the telemetry, not the environment's "
                f"{_ms(previous[0])}"
            )
        chosen[stage] = (value, TELEMETRY)
    for stage, value in (explicit or {}).items():
        recorded = telemetry.get(stage)
        if recorded is not None and recorded != value:
            notes.append(
                f"{stage}: budget {_ms(value)} as given, overriding the telemetry's {_ms(recorded)}"
            )
        chosen[stage] = (value, EXPLICIT)
    return chosen
