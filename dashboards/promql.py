"""Prometheus names of our telemetry, and the PromQL that dashboards and alerts share.

Names derive from ``otel_inference.semconv`` the way the OpenTelemetry Prometheus
exporters (the Python SDK's and the Collector's, ``UnderscoreEscapingWithSuffixes``)
translate them: dots become underscores, the unit adds a suffix (``s`` -> ``_seconds``,
``By`` -> ``_bytes``, ``{...}`` units none) and counters get ``_total``. A rename in
semconv therefore changes every panel and rule at once (``python -m dashboards.generate``),
and the live tests check each name against a real scrape.
"""

from __future__ import annotations

from otel_inference import semconv


def label(attribute: str) -> str:
    """Prometheus label of an OpenTelemetry attribute."""
    return attribute.replace(".", "_")


def metric(name: str, suffix: str = "") -> str:
    """Prometheus metric family of an OpenTelemetry instrument (``suffix``: unit, ``total``)."""
    return label(name) + (f"_{suffix}" if suffix else "")


# Metric families.
DURATION = metric(semconv.STAGE_DURATION, "seconds")  # histogram
COST = metric(semconv.STAGE_COST, "seconds")  # histogram: per-member share of batched work
BUDGET = metric(semconv.STAGE_BUDGET, "seconds")  # gauge
BREACHES = metric(semconv.STAGE_BUDGET_BREACHES, "total")  # counter
CALLS = metric(semconv.STAGE_CALLS)  # histogram, unit {call}: calls of a stage per request
CACHE_LOOKUPS = metric(semconv.CACHE_LOOKUPS, "total")  # counter
TOKENS = metric(semconv.TOKENS, "total")  # counter
TRANSFER_SIZE = metric(semconv.TRANSFER_SIZE, "bytes")  # histogram
BATCH_SIZE = metric(semconv.BATCH_SIZE)  # histogram, unit {request}: no suffix
BATCH_FILL_RATIO = metric(semconv.BATCH_FILL_RATIO)  # histogram, unit 1
SERIALIZE_SIZE = metric(semconv.SERIALIZE_SIZE, "bytes")  # histogram
EVENT_LOOP_DELAY = metric(semconv.EVENT_LOOP_DELAY, "seconds")  # histogram
EVENT_LOOP_BLOCKED = metric(semconv.EVENT_LOOP_BLOCKED, "seconds_total")  # counter
# Generation: the GenAI semantic conventions' server histograms.
TTFT = metric(semconv.GEN_AI_SERVER_TIME_TO_FIRST_TOKEN, "seconds")
TPOT = metric(semconv.GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN, "seconds")
TOKEN_USAGE = metric(semconv.GEN_AI_CLIENT_TOKEN_USAGE)  # histogram, unit {token}: no suffix

# Labels.
STAGE = label(semconv.INFERENCE_STAGE)
PARENT = label(semconv.INFERENCE_STAGE_PARENT)
ERROR_TYPE = label(semconv.ERROR_TYPE)
COLD_START = label(semconv.INFERENCE_COLD_START)
CACHE_RESULT = label(semconv.CACHE_RESULT)
TOKEN_KIND = label(semconv.INFERENCE_TOKEN_KIND)
BLOCKED_KIND = label(semconv.INFERENCE_EVENT_LOOP_BLOCKED_KIND)
GEN_AI_TOKEN_TYPE = label(semconv.GEN_AI_TOKEN_TYPE)
GEN_AI_MODEL = label(semconv.GEN_AI_REQUEST_MODEL)
# The torch instrumentor's direction attribute (h2d | d2h); no semconv constant yet.
TRANSFER_DIRECTION = label("inference.transfer.direction")
# The service: `job` is what both a direct scrape (scrape config) and the Collector's
# prometheus exporter (service.namespace/service.name) put on every series.
SERVICE = "job"

# Top-level stages only: their durations never overlap a parent's (timing rules).
TOP_LEVEL = f'{PARENT}=""'
REQUEST = semconv.REQUEST
QUEUE_WAIT = semconv.QUEUE_WAIT
PREFILL = semconv.PREFILL
DECODE = semconv.DECODE
TTFT_STAGE = semconv.TTFT  # budget pseudo-stages
TPOT_STAGE = semconv.TPOT

# The p95-vs-budget alert and the breach-ratio alert say the same thing: more than
# 5% of requests over budget is exactly a p95 over budget.
BREACH_RATIO_THRESHOLD = 0.05


def selector(*matchers: str) -> str:
    kept = [m for m in matchers if m]
    return "{" + ", ".join(kept) + "}" if kept else ""


def rate(series: str, matchers: tuple[str, ...], window: str) -> str:
    return f"rate({series}{selector(*matchers)}[{window}])"


def quantile(q: float, histogram: str, by: str, matchers: tuple[str, ...], window: str) -> str:
    """``histogram_quantile`` over bucket rates, summed ``by`` (plus ``le``)."""
    group = ", ".join(x for x in ("le", by) if x)
    return (
        f"histogram_quantile({q:g}, sum by ({group}) "
        f"({rate(histogram + '_bucket', matchers, window)}))"
    )


def stage_p95_over_budget(matchers: tuple[str, ...], window: str, p95: str | None = None) -> str:
    """p95 / budget per (service, stage): above 1 means over budget. Budgets come
    only from the app (the budget gauge), so no threshold lives in a rule file."""
    by = f"{SERVICE}, {STAGE}"
    p95 = p95 or quantile(0.95, DURATION, by, matchers, window)
    budget = f"max by ({by}) ({BUDGET}{selector(*matchers)})"
    return f"{p95}\n/ on ({by}) group_left\n{budget}"


def breach_ratio(matchers: tuple[str, ...], window: str) -> str:
    """Executions over budget / executions, per (service, stage): counted, exact."""
    by = f"{SERVICE}, {STAGE}"
    return (
        f"sum by ({by}) ({rate(BREACHES, matchers, window)})\n"
        f"/\nsum by ({by}) ({rate(DURATION + '_count', matchers, window)})"
    )
