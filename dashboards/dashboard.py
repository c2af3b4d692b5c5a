"""The "Inference stages" Grafana dashboard, as a Python model rendered to JSON.

Variables: ``datasource`` (Prometheus), ``service`` (the ``job`` label), ``stage``
(``inference_stage``) and ``cost_per_hour`` ($ per replica-hour for the cost panel).
Panel queries use ``$__rate_interval`` so they follow the scrape interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dashboards import promql
from dashboards.alerts import PROMETHEUS_DATASOURCE_UID

UID = "otel-inference-stages"
TITLE = "Inference stages"
RATE = "$__rate_interval"
# Every panel query carries the service and the cold-start filter: series without the
# label (batch size, budgets...) match `!~"true"` too.
SVC = f'{promql.SERVICE}=~"$service", {promql.COLD_START}!~"$cold_start"'
STG = f'{promql.STAGE}=~"$stage"'
NO_LABEL_VALUE = "__none__"  # matches no value: `!~` it excludes nothing
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
DEFAULT_COST_PER_HOUR = "2.50"


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = "__auto"
    exemplar: bool = False  # latency histograms: exemplar dots link to the trace


@dataclass
class Panel:
    title: str
    targets: list[Target]
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""
    width: int = 12
    height: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    overrides: list[dict[str, Any]] = field(default_factory=list)
    thresholds: list[tuple[float, str]] = field(default_factory=list)


def _budget_line_override() -> dict[str, Any]:
    """Budget series drawn as dashed lines over the percentile lines."""
    return {
        "matcher": {"id": "byRegexp", "options": ".*budget.*"},
        "properties": [
            {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
            {"id": "custom.lineWidth", "value": 2},
        ],
    }


def _stage_quantiles(q: float) -> Target:
    expr = promql.quantile(q, promql.DURATION, promql.STAGE, (SVC, STG), RATE)
    return Target(expr, f"{{{{{promql.STAGE}}}}} p{round(q * 100)}", exemplar=True)


def _ratio(numerator: str, denominator: str) -> str:
    return f"{numerator}\n/\n{denominator}"


def _sum_rate(series: str, *matchers: str, by: str = "") -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group} ({promql.rate(series, (SVC, *matchers), RATE)})"


def _cost_per_1k() -> str:
    """$ per 1k requests by stage: seconds of replica time each request takes in the
    stage x $/hour / 3600 x 1000. Batched stages count their per-member share
    (``inference_stage_cost_seconds``), others their duration; queue_wait is waiting,
    not work, and ``request`` is the total, so both are left out."""
    top = (SVC, promql.TOP_LEVEL)
    shared = f"sum by ({promql.STAGE}) ({promql.rate(promql.COST + '_sum', top, RATE)})"
    own = (
        f"sum by ({promql.STAGE}) ("
        + promql.rate(
            promql.DURATION + "_sum",
            (*top, f'{promql.STAGE}!~"{promql.REQUEST}|{promql.QUEUE_WAIT}"'),
            RATE,
        )
        + ")"
    )
    requests = _sum_rate(promql.DURATION + "_count", f'{promql.STAGE}="{promql.REQUEST}"')
    return f"(\n  {shared}\n  or\n  {own}\n)\n/ on () group_left\n{requests}\n* $cost_per_hour / 3600 * 1000"


def _event_loop_panels() -> list[Panel]:
    """Blocked event loops (issue 16): how late the loop runs, and how much of the
    time it was held past the threshold, by kind (busy, blocked, starved)."""
    delay = promql.quantile(0.99, promql.EVENT_LOOP_DELAY, promql.SERVICE, (SVC,), RATE)
    return [
        Panel(
            "Event loop delay p99",
            [Target(delay, "{{job}} p99")],
            unit="s",
            description=(
                "How late the event loop ran a due heartbeat (inference.runtime.event_loop.delay; "
                "semconv nodejs.eventloop.delay). Awaited stages wait this long on top of what "
                "they awaited."
            ),
        ),
        Panel(
            "Event loop held (share of time) by kind",
            [
                Target(
                    _sum_rate(
                        promql.EVENT_LOOP_BLOCKED, by=f"{promql.SERVICE}, {promql.BLOCKED_KIND}"
                    ),
                    f"{{{{job}}}} {{{{{promql.BLOCKED_KIND}}}}}",
                )
            ],
            unit="percentunit",
            description=(
                "Seconds per second the loop was held past OTEL_INFERENCE_EVENT_LOOP_THRESHOLD. "
                "busy: CPU work in a callback; blocked: a blocking call in a callback; starved: "
                "other threads or processes took the GIL or the CPUs. The culprits are on the "
                "spans (event_loop.blocked events) and in otel-inference report."
            ),
        ),
    ]


def rows() -> list[tuple[str, list[Panel]]]:
    stage_label = f"{{{{{promql.STAGE}}}}}"
    count = promql.DURATION + "_count"
    request = f'{promql.STAGE}="{promql.REQUEST}"'
    errors = f'{promql.ERROR_TYPE}!=""'
    budget = f"max by ({promql.STAGE}) ({promql.BUDGET}{promql.selector(SVC, STG)})"
    p95 = promql.quantile(0.95, promql.DURATION, promql.STAGE, (SVC, STG), RATE)
    # Top-level stages and unattributed: together they are the request time.
    top_level_time = (
        promql.DURATION + "_sum",
        promql.TOP_LEVEL,
        f'{promql.STAGE}!="{promql.REQUEST}"',
    )
    return [
        (
            "Latency by stage",
            [
                Panel(
                    "Stage p95 and budget",
                    [_stage_quantiles(0.95), Target(budget, f"{stage_label} budget")],
                    unit="s",
                    description="p95 per stage; dashed: the stage's budget (inference_stage_budget_seconds).",
                    overrides=[_budget_line_override()],
                ),
                Panel(
                    "Share of request time by stage (top-level stages)",
                    [
                        Target(
                            _ratio(
                                _sum_rate(*top_level_time, by=promql.STAGE),
                                f"on () group_left\n{_sum_rate(*top_level_time)}",
                            ),
                            stage_label,
                        )
                    ],
                    unit="percentunit",
                    kind="piechart",
                    description=(
                        'Time in each top-level stage (inference_stage_parent="", so nested '
                        "stages never double count) and unattributed, over all of it."
                    ),
                    options={
                        "pieType": "donut",
                        "legend": {"displayMode": "table", "values": ["percent"]},
                    },
                ),
                Panel("Stage p50", [_stage_quantiles(0.5)], unit="s", width=8),
                Panel("Stage p99", [_stage_quantiles(0.99)], unit="s", width=8),
                Panel(
                    "Stage p95 / budget",
                    [Target(_ratio(p95, f"on ({promql.STAGE}) group_left\n{budget}"), stage_label)],
                    unit="percentunit",
                    width=8,
                    description="Above 100%: the stage's p95 is over its budget (InferenceStageP95OverBudget).",
                    thresholds=[(1.0, "red")],
                ),
                Panel(
                    "Calls per request by stage (p95)",
                    [
                        Target(
                            promql.quantile(0.95, promql.CALLS, promql.STAGE, (SVC, STG), RATE),
                            stage_label,
                        )
                    ],
                    unit="short",
                    width=24,
                    description=(
                        "How many calls of each stage a request makes (inference_stage_calls): "
                        "above 1, an N+1 pattern (a lookup or a serialisation per item). A stage's "
                        "duration is the request's total time in it, whatever the count."
                    ),
                ),
            ],
        ),
        (
            "Traffic and errors",
            [
                Panel(
                    "Requests / s",
                    [Target(_sum_rate(count, request), "requests")],
                    unit="reqps",
                    width=8,
                ),
                Panel(
                    "Errors / s by stage",
                    [
                        Target(
                            _sum_rate(count, errors, by=f"{promql.STAGE}, {promql.ERROR_TYPE}"),
                            f"{stage_label} {{{{{promql.ERROR_TYPE}}}}}",
                        )
                    ],
                    unit="reqps",
                    width=8,
                ),
                Panel(
                    "Request error ratio",
                    [
                        Target(
                            _ratio(_sum_rate(count, request, errors), _sum_rate(count, request)),
                            "errors",
                        )
                    ],
                    unit="percentunit",
                    width=8,
                ),
            ],
        ),
        (
            "Features, tokens and payloads",
            [
                Panel(
                    "Feature cache hit ratio",
                    [
                        Target(
                            _ratio(
                                _sum_rate(promql.CACHE_LOOKUPS, f'{promql.CACHE_RESULT}="hit"'),
                                _sum_rate(promql.CACHE_LOOKUPS),
                            ),
                            "hit ratio",
                        )
                    ],
                    unit="percentunit",
                    width=8,
                    description="Per-key hits / lookups of feature_hydration reads.",
                ),
                Panel(
                    "Padding waste",
                    [
                        Target(
                            _ratio(
                                _sum_rate(promql.TOKENS, f'{promql.TOKEN_KIND}="padding"'),
                                _sum_rate(promql.TOKENS),
                            ),
                            "padding",
                        )
                    ],
                    unit="percentunit",
                    width=8,
                    description="Padding token positions / all positions produced by tokenize.",
                ),
                Panel(
                    "Response payload size p95",
                    [
                        Target(
                            promql.quantile(0.95, promql.SERIALIZE_SIZE, "", (SVC,), RATE),
                            "p95",
                        )
                    ],
                    unit="bytes",
                    width=8,
                ),
            ],
        ),
        (
            "Transfers and batching",
            [
                Panel(
                    "Host/device transfer bytes / s",
                    [
                        Target(
                            _sum_rate(promql.TRANSFER_SIZE + "_sum", by=promql.TRANSFER_DIRECTION),
                            f"{{{{{promql.TRANSFER_DIRECTION}}}}}",
                        )
                    ],
                    unit="Bps",
                    width=6,
                ),
                Panel(
                    "Batch size",
                    [
                        Target(promql.quantile(0.5, promql.BATCH_SIZE, "", (SVC,), RATE), "p50"),
                        Target(promql.quantile(0.95, promql.BATCH_SIZE, "", (SVC,), RATE), "p95"),
                        Target(
                            _ratio(
                                _sum_rate(promql.BATCH_SIZE + "_sum"),
                                _sum_rate(promql.BATCH_SIZE + "_count"),
                            ),
                            "mean",
                        ),
                    ],
                    width=6,
                ),
                Panel(
                    "Batch fill ratio (mean)",
                    [
                        Target(
                            _ratio(
                                _sum_rate(promql.BATCH_FILL_RATIO + "_sum"),
                                _sum_rate(promql.BATCH_FILL_RATIO + "_count"),
                            ),
                            "fill",
                        )
                    ],
                    unit="percentunit",
                    width=6,
                ),
                Panel(
                    "Queue wait",
                    [
                        Target(
                            promql.quantile(
                                q,
                                promql.DURATION,
                                "",
                                (SVC, f'{promql.STAGE}="{promql.QUEUE_WAIT}"'),
                                RATE,
                            ),
                            f"p{round(q * 100)}",
                            exemplar=True,
                        )
                        for q in (0.5, 0.95, 0.99)
                    ],
                    unit="s",
                    width=6,
                ),
            ],
        ),
        (
            "Budgets",
            [
                Panel(
                    "Budget breaches / s by stage",
                    [Target(_sum_rate(promql.BREACHES, STG, by=promql.STAGE), stage_label)],
                    unit="ops",
                ),
                Panel(
                    "Share of requests over budget",
                    [
                        Target(
                            _ratio(
                                _sum_rate(promql.BREACHES, STG, by=promql.STAGE),
                                _sum_rate(count, STG, by=promql.STAGE),
                            ),
                            stage_label,
                        )
                    ],
                    unit="percentunit",
                    description=(
                        "Counted, not interpolated. Above 5% means the stage's p95 is over budget "
                        "(InferenceStageBudgetBreachRatioHigh)."
                    ),
                    thresholds=[(promql.BREACH_RATIO_THRESHOLD, "red")],
                ),
            ],
        ),
        ("Event loop", _event_loop_panels()),
        _generation_row(),
        (
            "Cost",
            [
                Panel(
                    "Cost per 1k requests by stage",
                    [Target(_cost_per_1k(), stage_label)],
                    unit="currencyUSD",
                    kind="bargauge",
                    description=(
                        "Replica time per request in each stage x $cost_per_hour. Batched stages "
                        "count each request's share of the batch (inference.stage.cost)."
                    ),
                    options={"displayMode": "basic", "orientation": "horizontal"},
                ),
                Panel(
                    "Cost per 1k requests",
                    [Target(f"sum (\n{_cost_per_1k()}\n)", "all stages")],
                    unit="currencyUSD",
                    kind="stat",
                ),
            ],
        ),
    ]


def _generation_row() -> tuple[str, list[Panel]]:
    """TTFT and TPOT percentiles (GenAI semconv histograms) against their budgets
    (the ``ttft`` / ``tpot`` pseudo-stages of the budget gauge), output tokens/s, and
    the prefill / decode stages they come from."""

    def percentiles(histogram: str) -> list[Target]:
        return [
            Target(
                promql.quantile(q, histogram, promql.GEN_AI_MODEL, (SVC,), RATE),
                f"{{{{{promql.GEN_AI_MODEL}}}}} p{round(q * 100)}",
                exemplar=True,
            )
            for q in (0.5, 0.95, 0.99)
        ]

    def budget(stage: str) -> Target:
        matchers = promql.selector(SVC, f'{promql.STAGE}="{stage}"')
        return Target(f"max ({promql.BUDGET}{matchers})", "budget")

    phases = f'{promql.STAGE}=~"{promql.PREFILL}|{promql.DECODE}"'
    output = f'{promql.GEN_AI_TOKEN_TYPE}="output"'
    return (
        "Generation",
        [
            Panel(
                "Time to first token",
                [*percentiles(promql.TTFT), budget(promql.TTFT_STAGE)],
                unit="s",
                width=8,
                description=(
                    "gen_ai.server.time_to_first_token: from the request's start (queue "
                    "included) to the first output token; dashed: the ttft budget."
                ),
                overrides=[_budget_line_override()],
            ),
            Panel(
                "Time per output token",
                [*percentiles(promql.TPOT), budget(promql.TPOT_STAGE)],
                unit="s",
                width=8,
                description=(
                    "gen_ai.server.time_per_output_token: decode time over the tokens after "
                    "the first; dashed: the tpot budget."
                ),
                overrides=[_budget_line_override()],
            ),
            Panel(
                "Output tokens / s",
                [
                    Target(
                        _sum_rate(promql.TOKEN_USAGE + "_sum", output, by=promql.GEN_AI_MODEL),
                        f"{{{{{promql.GEN_AI_MODEL}}}}}",
                    )
                ],
                unit="short",
                width=8,
                description="Generated tokens per second (gen_ai.client.token.usage, output).",
            ),
            Panel(
                "Prefill and decode p95",
                [
                    Target(
                        promql.quantile(0.95, promql.DURATION, promql.STAGE, (SVC, phases), RATE),
                        f"{{{{{promql.STAGE}}}}} p95",
                        exemplar=True,
                    )
                ],
                unit="s",
                description="The two phases of generate, each recorded once per request.",
            ),
            Panel(
                "Input and output tokens per request (mean)",
                [
                    Target(
                        _ratio(
                            _sum_rate(promql.TOKEN_USAGE + "_sum", by=promql.GEN_AI_TOKEN_TYPE),
                            _sum_rate(promql.TOKEN_USAGE + "_count", by=promql.GEN_AI_TOKEN_TYPE),
                        ),
                        f"{{{{{promql.GEN_AI_TOKEN_TYPE}}}}}",
                    )
                ],
                unit="short",
            ),
        ],
    )


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    steps = [{"color": "green", "value": None}] + [
        {"color": color, "value": value} for value, color in panel.thresholds
    ]
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "thresholds": {"mode": "absolute", "steps": steps},
    }
    if panel.thresholds and panel.kind == "timeseries":
        defaults["custom"] = {"thresholdsStyle": {"mode": "line"}}
    options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}
    if panel.kind in ("piechart", "bargauge", "stat"):
        options["reduceOptions"] = {"calcs": ["lastNotNull"], "fields": "", "values": False}
    options.update(panel.options)
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": panel.overrides},
        "options": options,
        "targets": [
            {
                "refId": chr(ord("A") + index),
                "datasource": DATASOURCE,
                "expr": target.expr,
                "legendFormat": target.legend,
                "exemplar": target.exemplar,
                "range": True,
            }
            for index, target in enumerate(panel.targets)
        ],
    }


def _templating() -> list[dict[str, Any]]:
    def query_variable(name: str, label: str, query: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-variable"},
            "definition": query,
            "refresh": 2,  # on time range change
            "includeAll": True,
            "multi": True,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1,
        }

    return [
        {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {"text": "Prometheus", "value": PROMETHEUS_DATASOURCE_UID},
        },
        query_variable(
            "service", "Service", f"label_values({promql.DURATION}_count, {promql.SERVICE})"
        ),
        query_variable(
            "stage",
            "Stage",
            f'label_values({promql.DURATION}_count{{{promql.SERVICE}=~"$service"}}, {promql.STAGE})',
        ),
        {
            # Cold requests (first after start, warm-up) carry inference_cold_start="true":
            # steady-state percentiles exclude them by default.
            "name": "cold_start",
            "label": "Requests",
            "type": "custom",
            "query": f"Steady state : true,All (incl. cold start) : {NO_LABEL_VALUE}",
            "options": [
                {"text": "Steady state", "value": "true", "selected": True},
                {"text": "All (incl. cold start)", "value": NO_LABEL_VALUE, "selected": False},
            ],
            "current": {"text": "Steady state", "value": "true"},
        },
        {
            "name": "cost_per_hour",
            "label": "$ / replica-hour",
            "type": "textbox",
            "query": DEFAULT_COST_PER_HOUR,
            "current": {"text": DEFAULT_COST_PER_HOUR, "value": DEFAULT_COST_PER_HOUR},
        },
    ]


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    panel_id, y = 1, 0
    for title, row_panels in rows():
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        panel_id, y, x = panel_id + 1, y + 1, 0
        for panel in row_panels:
            if x + panel.width > 24:
                x, y = 0, y + panel.height
            panels.append(_panel_json(panel, panel_id, x, y))
            panel_id, x = panel_id + 1, x + panel.width
        y += max(p.height for p in row_panels)
    return {
        "uid": UID,
        "title": TITLE,
        "tags": ["otel-inference", "inference"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,  # shared crosshair
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "schemaVersion": 39,
        "version": 1,
        "templating": {"list": _templating()},
        "annotations": {"list": []},
        "panels": panels,
    }
