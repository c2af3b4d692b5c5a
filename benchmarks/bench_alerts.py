"""Budget alerts on the accuracy pipelines: the shipped rules fire for exactly the breaching stage.

The accuracy benchmark's pipelines (``benchmarks/bench_accuracy.py``: same shapes, seeds
and N, so the same planned work) run again with latency budgets given to
``StageRecorder`` as a user gives them. The budgets come from each shape's design,
never from the measured run:

* the heavy stage gets the tail's smallest spike (12 ms; 8 ms for transfer-bound):
  every spiked request (8% of them) is over it, ordinary work (median x e^(3 sigma),
  about 2.1x the median) under it. In the gap shape the heavy ``postprocess`` runs
  outside any stage, so the breaching "stage" is ``unattributed`` and it gets that budget;
* every other stage, ``unattributed`` included, 4x its median (at least 1 ms): with
  sigma 0.25 a stage's p95 sits at about 1.5x its median;
* ``request``: twice the sum of the medians plus the largest spike, well above its p95.

The run's metrics reach the rules the way a user's do: ``PrometheusMetricReader`` on
the MeterProvider, ``prometheus_client.generate_latest``, parsed back with the client's
text parser, plus the ``job`` and ``instance`` labels a scrape adds. Each sample becomes
a promtool ``input_series`` that replays the run's traffic once a minute (cumulative
series grow by the run's value each minute, gauges stay), so every 5m rate window sees
exactly the run's distribution. ``promtool test rules`` evaluates the SHIPPED
``dashboards/prometheus/inference-rules.yaml`` (``for: 5m`` as shipped) at 10m and must
find exactly the heavy stage's ``InferenceStageP95OverBudget`` and
``InferenceStageBudgetBreachRatioHigh``: promtool fails on a missing alert and on an
extra one (any other stage's, or ``InferenceRequestOverBudget``).

promtool also compares annotations exactly. Their expected text is the rule's own
template filled with the value computed here from the scraped samples as Prometheus
computes it (histogram_quantile's interpolation within the bucket, the breach ratio),
formatted as ``humanizePercentage`` does (``%.4g``): an independent check of the
figure, not a copy of promtool's answer.

    .venv/bin/python -m benchmarks.bench_alerts          # ~30 s; rewrites its section
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.bench_accuracy import (
    REQUEST,
    SHAPES,
    UNATTRIBUTED,
    Run,
    Shape,
    nearest_rank,
    run_shape,
)
from benchmarks.harness import RESULTS_PATH, environment_line, write_section
from dashboards.generate import PROMETHEUS_RULES

TITLE = "Budget alerts: the shipped rules on the accuracy pipelines"
JOB = "accuracy"  # service.name: the job label the Collector's Prometheus exporter sets
INSTANCE = "127.0.0.1:9464"  # what a direct scrape of the exporter would add
STAGE = "inference_stage"
COLD_START = "inference_cold_start"
STEPS = 15  # one-minute samples 0m..15m
EVAL_TIME = "10m"  # the condition holds from the first rate (1m): past the shipped `for: 5m`
GENEROUS = 4.0  # x median, for every stage that should stay quiet
FLOOR_MS = 1.0
P95_ALERT = "InferenceStageP95OverBudget"
RATIO_ALERT = "InferenceStageBudgetBreachRatioHigh"
DURATION = "inference_stage_duration_seconds"
BREACHES = "inference_stage_budget_breaches_total"
BUDGET = "inference_stage_budget_seconds"

Alert = tuple[str, str]  # (alertname, inference_stage)


# -- budgets and expectations, from the shape's design ------------------------------


def breaching_stage(shape: Shape) -> str:
    """Where the heavy tail shows: its stage, or ``unattributed`` when that stage is uninstrumented."""
    return UNATTRIBUTED if shape.tail_stage == shape.uninstrumented else shape.tail_stage


def design_budgets(shape: Shape, *, breach: bool = True) -> dict[str, str]:
    """Budgets for ``run_shape``; with ``breach=False`` the heavy stage's also covers its tail."""
    medians = shape.medians()
    work = {name: ms for name, ms in medians.items() if name != shape.uninstrumented}
    work[UNATTRIBUTED] = medians[shape.uninstrumented] if shape.uninstrumented else 0.0
    budgets = {name: max(GENEROUS * ms, FLOOR_MS) for name, ms in work.items()}
    heavy = breaching_stage(shape)
    budgets[heavy] = shape.tail_ms[0] if breach else GENEROUS * work[heavy] + shape.tail_ms[1]
    budgets[REQUEST] = 2 * sum(medians.values()) + shape.tail_ms[1]
    # Strings, parsed with Decimal: "2.4ms" is exactly 0.0024 s, the bucket boundary.
    return {name: f"{ms:g}ms" for name, ms in budgets.items()}


def expected_alerts(shape: Shape, *, breach: bool = True) -> frozenset[Alert]:
    stage = breaching_stage(shape)
    return frozenset({(P95_ALERT, stage), (RATIO_ALERT, stage)}) if breach else frozenset()


# -- the scrape ---------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float
    cumulative: bool  # counter, bucket, _count, _sum: grows with traffic


def scrape(exposition: str) -> list[Sample]:
    """The exporter's text as Prometheus ingests it, with the labels a scrape adds."""
    samples = []
    for family in text_string_to_metric_families(exposition):
        cumulative = family.type in ("counter", "histogram")
        for sample in family.samples:
            labels = {**sample.labels, "job": JOB, "instance": INSTANCE}
            grows = cumulative and not sample.name.endswith("_created")
            samples.append(Sample(sample.name, labels, sample.value, grows))
    return samples


def _judged(sample: Sample, name: str, stage: str) -> bool:
    """A series the rules judge: ``name`` for ``stage``, steady state (the rules leave
    out ``inference_cold_start="true"``, the process's first requests)."""
    return (
        sample.name == name
        and sample.labels.get(STAGE) == stage
        and sample.labels.get(COLD_START) != "true"
    )


def _total(samples: Sequence[Sample], name: str, stage: str) -> float:
    """``sum by (job, inference_stage)``: the scrape has one job."""
    return sum(s.value for s in samples if _judged(s, name, stage))


def histogram_quantile(q: float, samples: Sequence[Sample], stage: str) -> float:
    """Prometheus's histogram_quantile over ``stage``'s buckets (linear within a bucket)."""
    buckets: dict[float, float] = {}
    for s in samples:
        if _judged(s, f"{DURATION}_bucket", stage):
            le = float(s.labels["le"])
            buckets[le] = buckets.get(le, 0.0) + s.value
    bounds = sorted(buckets)
    counts = [buckets[b] for b in bounds]
    rank = q * counts[-1]
    b = next((i for i, c in enumerate(counts[:-1]) if c >= rank), len(counts) - 1)
    if b == len(counts) - 1:  # in the +Inf bucket: the highest finite bound
        return bounds[-2]
    start, below = (bounds[b - 1], counts[b - 1]) if b > 0 else (0.0, 0.0)
    return start + (bounds[b] - start) * ((rank - below) / (counts[b] - below))


def budget_of(samples: Sequence[Sample], stage: str) -> float:
    return max(s.value for s in samples if s.name == BUDGET and s.labels.get(STAGE) == stage)


def p95_over_budget(samples: Sequence[Sample], stage: str) -> float:
    return histogram_quantile(0.95, samples, stage) / budget_of(samples, stage)


def breach_ratio(samples: Sequence[Sample], stage: str) -> float:
    return _total(samples, BREACHES, stage) / _total(samples, f"{DURATION}_count", stage)


# The value each shipped alert's expression yields, for its annotation.
ALERT_VALUES: dict[str, Callable[[Sequence[Sample], str], float]] = {
    P95_ALERT: p95_over_budget,
    RATIO_ALERT: breach_ratio,
    "InferenceRequestOverBudget": p95_over_budget,
}


# -- the promtool rule test ---------------------------------------------------------


def _number(value: float) -> str:
    """Plain decimal, no exponent, for promtool's series notation."""
    return format(Decimal(repr(value)), "f")


def _series(sample: Sample) -> str:
    def quoted(value: str) -> str:
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'

    labels = ", ".join(f"{k}={quoted(v)}" for k, v in sorted(sample.labels.items()))
    return f"{sample.name}{{{labels}}}"


def input_series(samples: Sequence[Sample]) -> list[dict[str, str]]:
    """The run once a minute: cumulative series ``0+v`` per step, gauges constant."""
    return [
        {
            "series": _series(s),
            "values": f"0+{_number(s.value)}x{STEPS}"
            if s.cumulative
            else f"{_number(s.value)}x{STEPS}",
        }
        for s in samples
    ]


def humanize_percentage(value: float) -> str:
    """Prometheus's template function: ``fmt.Sprintf("%.4g%%", v*100)``."""
    return f"{value * 100:.4g}%"


_TEMPLATE = re.compile(r"\{\{\s*(?:\$labels\.(\w+)|\$value\s*\|\s*humanizePercentage)\s*\}\}")


def render(template: str, labels: dict[str, str], value: float) -> str:
    """Fill the shipped annotation templates (the constructs they use, no more)."""
    text = _TEMPLATE.sub(lambda m: labels[m[1]] if m[1] else humanize_percentage(value), template)
    if "{{" in text:
        raise ValueError(f"template construct not mirrored here: {template!r}")
    return text


def alert_rules(path: Path = PROMETHEUS_RULES) -> list[dict[str, Any]]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _expected_alert(
    rule: dict[str, Any], stage: str, samples: Sequence[Sample]
) -> dict[str, dict[str, str]]:
    labels = {**rule.get("labels", {}), "job": JOB, STAGE: stage}
    value = ALERT_VALUES[rule["alert"]](samples, stage)
    annotations = {k: render(v, labels, value) for k, v in rule.get("annotations", {}).items()}
    return {"exp_labels": labels, "exp_annotations": annotations}


def rule_test(
    samples: Sequence[Sample], expected: Collection[Alert], rules_path: Path = PROMETHEUS_RULES
) -> dict[str, Any]:
    """A promtool test file: every shipped alert, each expecting exactly ``expected``'s stages."""
    rules = alert_rules(rules_path)
    unknown = {name for name, _ in expected} - {rule["alert"] for rule in rules}
    if unknown:
        raise ValueError(f"no such alert in {rules_path.name}: {sorted(unknown)}")
    alerts = [
        {
            "eval_time": EVAL_TIME,
            "alertname": rule["alert"],
            "exp_alerts": [
                _expected_alert(rule, stage, samples)
                for name, stage in sorted(expected)
                if name == rule["alert"]
            ],
        }
        for rule in rules
    ]
    return {
        "rule_files": [rules_path.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": "accuracy run replayed",
                "interval": "1m",
                "input_series": input_series(samples),
                "alert_rule_test": alerts,
            }
        ],
    }


def promtool_test(
    test: dict[str, Any], promtool: str = "promtool", rules_path: Path = PROMETHEUS_RULES
) -> subprocess.CompletedProcess[str]:
    """``promtool test rules`` in a temp dir holding a copy of the rules file and the test."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(rules_path, Path(tmp) / rules_path.name)
        path = Path(tmp) / "accuracy-alerts.test.yaml"
        path.write_text(yaml.safe_dump(test, sort_keys=False, width=1000))
        return subprocess.run(
            [promtool, "test", "rules", path.name],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=120,
        )


@dataclass
class AlertCheck:
    run: Run
    samples: list[Sample]
    expected: frozenset[Alert]
    result: subprocess.CompletedProcess[str]

    @property
    def ok(self) -> bool:
        return self.result.returncode == 0

    @property
    def output(self) -> str:
        return self.result.stdout + self.result.stderr


def check_alerts(run: Run, expected: Collection[Alert], promtool: str = "promtool") -> AlertCheck:
    """Replay ``run``'s scrape through the shipped rules; promtool judges ``expected``."""
    samples = scrape(run.exposition)
    result = promtool_test(rule_test(samples, expected), promtool)
    return AlertCheck(run, samples, frozenset(expected), result)


# -- the benchmark ------------------------------------------------------------------


def true_work(run: Run, stage: str) -> list[float]:
    """Seconds of work the pipeline measured in ``stage`` (the uninstrumented one's for
    ``unattributed``), per request."""
    key = run.shape.uninstrumented if stage == UNATTRIBUTED else stage
    return [t[key] / 1e9 for t in run.truths]


def _row(check: AlertCheck) -> str:
    shape, samples = check.run.shape, check.samples
    stage = breaching_stage(shape)
    budget = budget_of(samples, stage)
    work = true_work(check.run, stage)
    over = sum(w > budget for w in work) / len(work)
    fired = ", ".join(sorted(name for name, _ in check.expected)) if check.ok else "see below"
    request_p95 = nearest_rank([t[REQUEST] / 1e9 for t in check.run.truths], 0.95)
    return (
        f"| {shape.name} | `{stage}` | {budget * 1000:g} | {nearest_rank(work, 0.95) * 1000:.3f} "
        f"| {histogram_quantile(0.95, samples, stage) * 1000:.3f} | {over:.1%} "
        f"| {breach_ratio(samples, stage):.1%} "
        f"| {request_p95 * 1000:.3f} / {budget_of(samples, REQUEST) * 1000:g} "
        f"| {fired} | {'PASS' if check.ok else '**FAIL**'} |"
    )


def _budgets_line(check: AlertCheck) -> str:
    budgets = sorted((s.labels[STAGE], s.value) for s in check.samples if s.name == BUDGET)
    return f"- {check.run.shape.name}: " + ", ".join(f"{k} {v * 1000:g}" for k, v in budgets)


def promtool_version(promtool: str) -> str:
    out = subprocess.run([promtool, "--version"], capture_output=True, text=True).stdout
    return out.split("(")[0].strip() or "promtool"


def markdown(checks: Sequence[AlertCheck], n: int, elapsed_s: float, promtool: str) -> str:
    lines = [
        f"## {TITLE}",
        "",
        f"{n} requests per shape (the accuracy benchmark's shapes and seeds), {elapsed_s:.0f} s "
        f"in all; {promtool_version(promtool)}; {environment_line()}",
        "",
        "Budgets from each shape's design: the heavy stage the tail's smallest spike, every "
        "other stage (and `unattributed`) 4x its median (at least 1 ms), `request` twice the "
        "sum of the medians plus the largest spike. The run's metrics as Prometheus scrapes "
        "them (PrometheusMetricReader, `generate_latest`, the client's text parser, "
        f'`job="{JOB}"`) are replayed once a minute into `promtool test rules` against the '
        "shipped `dashboards/prometheus/inference-rules.yaml` (`for: 5m`), evaluated at "
        f"{EVAL_TIME}: PASS means exactly the listed alerts fire, for the breaching stage "
        "only, annotations included (promtool fails on any missing or extra alert). Times in "
        "ms; p95 scraped is histogram_quantile over the scraped buckets (the budget is a "
        "bucket boundary); over budget: share of the stage's executions, as the pipeline "
        "measured its work and as the breach counter counted; `request`'s budget sits above "
        "its true p95, so `InferenceRequestOverBudget` must stay silent.",
        "",
        "| shape | breaching stage | budget | p95 truth | p95 scraped | over budget truth "
        "| over budget counted | request p95 truth / budget | alerts fired | promtool |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
        *(_row(check) for check in checks),
        "",
        "Budgets (ms):",
        "",
        *(_budgets_line(check) for check in checks),
    ]
    failed = [check for check in checks if not check.ok]
    lines += ["", f"Overall: {len(checks) - len(failed)}/{len(checks)} shapes PASS."]
    for check in failed:
        lines += [
            "",
            f"promtool on {check.run.shape.name}:",
            "",
            "```",
            check.output.strip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


def main(n: int = 400) -> list[AlertCheck]:
    promtool = shutil.which("promtool")
    if promtool is None:
        raise SystemExit("promtool is not installed (apt-get install prometheus)")
    start = time.perf_counter()
    checks = []
    for index, shape in enumerate(SHAPES):
        run = run_shape(shape, n=n, seed=9 + index, budgets=design_budgets(shape))
        check = check_alerts(run, expected_alerts(shape), promtool)
        checks.append(check)
        print(f"{shape.name}: {'PASS' if check.ok else 'FAIL'}", flush=True)
        if not check.ok:
            print(check.output, flush=True)
    body = markdown(checks, n, time.perf_counter() - start, promtool)
    write_section(TITLE, body, RESULTS_PATH)
    print(body)
    return checks


if __name__ == "__main__":
    main()
