"""Per-stage percentiles, counts and budgets from the Prometheus HTTP API.

Prometheus holds histograms for 100% of requests but no traces, so this
source gives count, p50/p95/p99 (``histogram_quantile`` over
``inference_stage_duration_seconds_bucket``) and budgets
(``inference_stage_budget_seconds``) per stage, nested stages by their
``inference_stage_parent`` label, ``unattributed`` and ``request`` included.
Share of tail and cost need spans: they are left empty, and the verdict weighs
each stage's p95 against the end-to-end p95 instead.

Figures cover the last ``window`` (``increase(...[5m])``); when nothing was
observed in it (a load that ended earlier), they fall back to the totals since
each process started, and the report says so.

Usage::

    from otel_inference.report.prometheus import prometheus_report

    report = prometheus_report("http://127.0.0.1:9090", service="embedder", window="5m")
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from otel_inference import semconv
from otel_inference.report._budgets import choose_budgets, learnt_budgets
from otel_inference.report._http import base_url, get_json
from otel_inference.report._model import Padding, Report, ReportError, StageRow
from otel_inference.report.analysis import order_key
from otel_inference.report.generation import from_rows
from otel_inference.report.padding import padding_from_counts
from otel_inference.report.verdict import decide

DURATION = "inference_stage_duration_seconds"
BUDGET = "inference_stage_budget_seconds"
TOKENS = "inference_tokens_total"
DEFAULT_WINDOW = "5m"
_WINDOW = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
_LABEL_VALUE = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*\s*(=|!=|=~|!~)\s*"')
PERCENTILE_METHOD = (
    "Prometheus histogram_quantile: linear interpolation inside the bucket holding the "
    "quantile (within one bucket of the truth; every budget is a bucket boundary)"
)
_BY = "inference_stage, inference_stage_parent"


def selector(service: str | None, *, exclude_cold_start: bool = False) -> str:
    """Label matchers: ``service="x"`` for a bare name, or matchers given as is
    (``job="app",env="prod"``)."""
    matchers: list[str] = []
    if service:
        text = service.strip()
        if _LABEL_VALUE.match(text):
            matchers.append(text)
        else:
            escaped = text.replace("\\", "\\\\").replace('"', '\\"')
            matchers.append(f'service="{escaped}"')
    if exclude_cold_start:
        matchers.append(f'{semconv.INFERENCE_COLD_START.replace(".", "_")}!="true"')
    return "{" + ",".join(matchers) + "}" if matchers else ""


def _number(value: Any) -> float | None:
    try:
        number = float(value[1])
    except (TypeError, ValueError, IndexError):
        return None
    return number if math.isfinite(number) else None


class _Client:
    def __init__(self, url: str, timeout: float) -> None:
        self.url = base_url(url, what="Prometheus")
        self.timeout = timeout

    def series(self, promql: str) -> list[tuple[Mapping[str, str], float | None]]:
        """Every series of an instant query: (labels, value)."""
        body = get_json(
            f"{self.url}/api/v1/query", {"query": promql}, what="Prometheus", timeout=self.timeout
        )
        if not isinstance(body, Mapping) or body.get("status") != "success":
            error = body.get("error") if isinstance(body, Mapping) else None
            raise ReportError(f"Prometheus at {self.url} rejected a query: {error or body!r}")
        return [
            (item.get("metric", {}), _number(item.get("value")))
            for item in body.get("data", {}).get("result", [])
        ]

    def query(self, promql: str) -> dict[tuple[str, str], float | None]:
        result: dict[tuple[str, str], float | None] = {}
        for labels, value in self.series(promql):
            key = (labels.get("inference_stage", ""), labels.get("inference_stage_parent", ""))
            result[key] = value
        return result


def prometheus_report(
    url: str,
    *,
    service: str | None = None,
    window: str = DEFAULT_WINDOW,
    budgets: Mapping[str, float] | None = None,
    default_budgets: Mapping[str, float] | None = None,
    exclude_cold_start: bool = False,
    timeout: float = 30.0,
) -> Report:
    """The per-stage report from Prometheus (percentiles, counts, budgets).

    Budgets: ``budgets`` (``--budgets``) override those of the service's
    ``inference_stage_budget_seconds`` gauge, which override ``default_budgets``
    (the report's own environment).
    """
    if not _WINDOW.match(window.strip()):
        raise ReportError(f"--window {window!r} must be a Prometheus duration such as 5m or 1h")
    window = window.strip()
    client = _Client(url, timeout)
    sel = selector(service, exclude_cold_start=exclude_cold_start)
    notes: list[str] = []

    def series(name: str, windowed: bool) -> str:
        return f"increase({name}{sel}[{window}])" if windowed else f"{name}{sel}"

    windowed = True
    counts = client.query(f"sum by ({_BY}) ({series(DURATION + '_count', True)})")
    if not any(counts.values()):
        windowed = False
        counts = client.query(f"sum by ({_BY}) ({series(DURATION + '_count', False)})")
        if counts:
            notes.append(
                f"nothing was observed in the last {window}: figures are totals since each "
                "process started"
            )
    if not any(counts.values()):
        raise ReportError(
            f"Prometheus at {client.url} has no {DURATION} series{' ' + sel if sel else ''}: "
            "is it scraping the service's metrics endpoint (OTEL_METRICS_EXPORTER=prometheus)?"
        )
    quantiles = {
        q: client.query(
            f"histogram_quantile({q}, sum by (le, {_BY}) ({series(DURATION + '_bucket', windowed)}))"
        )
        for q in (0.5, 0.95, 0.99)
    }
    # Every series of the gauge (one per process): disagreeing budgets are said.
    gauge: dict[str, list[float]] = {}
    for labels, value in client.series(f"{BUDGET}{sel}"):
        if value is not None and value > 0:
            gauge.setdefault(labels.get("inference_stage", ""), []).append(value)
    learnt, budget_notes = learnt_budgets(gauge, what="series")
    chosen = choose_budgets(
        explicit=budgets, telemetry=learnt, environment=default_budgets, notes=budget_notes
    )
    notes.extend(budget_notes)
    rows, generation = from_rows(
        _rows(counts, quantiles, {stage: value for stage, (value, _) in chosen.items()})
    )
    for row in rows:
        if row.budget is not None:
            row.budget_source = chosen[row.stage][1]
    padding = _padding(client, series, windowed, counts)
    request = next((r for r in rows if r.kind == "request"), None)
    where = f"Prometheus at {client.url}" + (f" ({sel})" if sel else "")
    where += f", last {window}" if windowed else ", since process start"
    return Report(
        source=where,
        requests=request.count if request else 0,
        rows=rows,
        verdict=decide(rows, basis="p95"),
        percentile_method=PERCENTILE_METHOD,
        notes=[
            *notes,
            "share of tail and cost need spans (--spans or --jaeger); the verdict weighs p95s",
        ],
        generation=generation,
        padding=padding,
    )


def _padding(
    client: _Client,
    series: Any,
    windowed: bool,
    counts: Mapping[tuple[str, str], float | None],
) -> Padding | None:
    """Real vs padding tokens from the ``inference_tokens_total`` counter."""
    by_kind = {
        labels.get("inference_token_kind"): value or 0.0
        for labels, value in client.series(
            f"sum by (inference_token_kind) ({series(TOKENS, windowed)})"
        )
    }
    calls = sum(round(v or 0) for (stage, _), v in counts.items() if stage == semconv.TOKENIZE)
    return padding_from_counts(
        by_kind.get(semconv.TOKEN_KIND_REAL, 0.0),
        by_kind.get(semconv.TOKEN_KIND_PADDING, 0.0),
        calls,
    )


def _rows(
    counts: Mapping[tuple[str, str], float | None],
    quantiles: Mapping[float, Mapping[tuple[str, str], float | None]],
    budgets: Mapping[str, float],
) -> list[StageRow]:
    def row(key: tuple[str, str], kind: str) -> StageRow:
        stage, parent = key
        made = StageRow(
            stage=stage,
            kind=kind,
            parent=parent or None,
            count=round(counts.get(key) or 0),
            p50=quantiles[0.5].get(key),
            p95=quantiles[0.95].get(key),
            p99=quantiles[0.99].get(key),
            budget=budgets.get(stage),
        )
        if made.budget is not None and made.p95 is not None:
            made.status = "over" if made.p95 > made.budget else "ok"
        return made

    keys = [k for k, v in counts.items() if v]
    special = (semconv.UNATTRIBUTED, semconv.REQUEST)
    top = sorted(
        (k for k in keys if not k[1] and k[0] not in special), key=lambda k: order_key(k[0])
    )
    nested = sorted((k for k in keys if k[1]), key=lambda k: order_key(k[0]))
    rows: list[StageRow] = []
    for key in top:
        rows.append(row(key, "stage"))
        rows += [row(k, "nested") for k in nested if k[1] == key[0]]
    rows += [row(k, "nested") for k in nested if k[1] not in {t[0] for t in top}]
    for stage in special:
        if counts.get((stage, "")):
            rows.append(
                row((stage, ""), "unattributed" if stage == semconv.UNATTRIBUTED else "request")
            )
    return rows
