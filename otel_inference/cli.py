"""The ``otel-inference`` command line: ``otel-inference report``.

Usage::

    # spans from a file (default: $OTEL_INFERENCE_SPANS_FILE, else build/demo/spans.jsonl)
    otel-inference report --spans build/demo/spans.jsonl --cost-per-hour 2.5
    # spans from the Jaeger query API
    otel-inference report --jaeger http://127.0.0.1:16686 --service embedder --lookback 1h
    # percentiles only, from Prometheus
    otel-inference report --prometheus http://127.0.0.1:9090 --service embedder --window 5m
    # other formats
    otel-inference report --format html --output report.html

Budgets, per stage: ``--budgets "tokenize=5ms,..."``, else the telemetry's (the
``inference.budget`` span attribute; Prometheus: the service's
``inference_stage_budget_seconds`` gauge), else the report's own
``OTEL_INFERENCE_BUDGETS`` / ``OTEL_INFERENCE_BUDGETS_FILE``.

Exit status: 0 on success; 1 for bad input (a missing or empty file, spans
without otel-inference attributes, an unreachable Jaeger or Prometheus), with
one message on stderr; 2 for malformed options.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from otel_inference.budgets import budgets_from_env, parse_budgets
from otel_inference.config import ConfigurationError
from otel_inference.environment_variables import OTEL_INFERENCE_SPANS_FILE
from otel_inference.report import (
    RENDERERS,
    Report,
    ReportError,
    build_report,
    load_jaeger,
    load_spans_file,
    prometheus_report,
)
from otel_inference.report.jaeger import DEFAULT_LIMIT, DEFAULT_LOOKBACK
from otel_inference.report.prometheus import DEFAULT_WINDOW

PROG = "otel-inference"
DEFAULT_SPANS_FILE = Path("build") / "demo" / "spans.jsonl"
"""Where ``make demo`` writes its spans; used when ``OTEL_INFERENCE_SPANS_FILE`` is unset."""


def default_spans_file(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    configured = environ.get(OTEL_INFERENCE_SPANS_FILE, "").strip()
    return Path(configured).expanduser() if configured else DEFAULT_SPANS_FILE


def _dollars(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of dollars") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite, non-negative number")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _budgets(text: str) -> Mapping[str, float]:
    try:
        return parse_budgets(text, source="--budgets")
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog=PROG, description="Per-stage latency tools for OpenTelemetry inference services."
    )
    commands = root.add_subparsers(dest="command", metavar="COMMAND", required=True)
    report = commands.add_parser(
        "report",
        help="per-stage percentiles, share of tail, budgets, cost and a verdict",
        description=(
            "Where did the time go? Per stage: count, p50/p95/p99, share of tail latency, "
            "budget status and cost per request, an unattributed row, and a verdict."
        ),
    )
    source = report.add_mutually_exclusive_group()
    source.add_argument(
        "--spans",
        metavar="FILE",
        type=Path,
        help=f"OTLP JSON Lines span file (default: ${OTEL_INFERENCE_SPANS_FILE}, "
        f"else {DEFAULT_SPANS_FILE})",
    )
    source.add_argument(
        "--jaeger", metavar="URL", help="Jaeger query service, e.g. http://host:16686"
    )
    source.add_argument(
        "--prometheus", metavar="URL", help="Prometheus, e.g. http://host:9090 (percentiles only)"
    )
    report.add_argument(
        "--service",
        metavar="NAME",
        help='Jaeger: the service name (required); Prometheus: value of the "service" label, '
        'or label matchers such as job="app"',
    )
    report.add_argument("--lookback", default=DEFAULT_LOOKBACK, help="Jaeger: how far back (1h)")
    report.add_argument(
        "--limit", type=_positive_int, default=DEFAULT_LIMIT, help="Jaeger: most traces (1000)"
    )
    report.add_argument("--window", default=DEFAULT_WINDOW, help="Prometheus: range window (5m)")
    report.add_argument("--format", choices=sorted(RENDERERS), default="table")
    report.add_argument("--output", metavar="FILE", type=Path, help="write here, not to stdout")
    report.add_argument(
        "--cost-per-hour",
        metavar="DOLLARS",
        type=_dollars,
        help="serving cost in $/hour: adds cost per request by stage",
    )
    report.add_argument(
        "--budgets",
        metavar="SPEC",
        type=_budgets,
        help='"tokenize=5ms,model_forward=14ms,request=200ms": overrides the budgets the '
        "telemetry carries (default: those, else OTEL_INFERENCE_BUDGETS)",
    )
    report.add_argument(
        "--exclude-cold-start",
        action="store_true",
        help="leave out requests flagged inference.cold_start=true (on their span or stages)",
    )
    return root


def make_report(args: argparse.Namespace) -> Report:
    """The report the parsed ``args`` ask for; :class:`ReportError` on bad input."""
    try:
        env_budgets = budgets_from_env()
    except ConfigurationError as exc:
        if args.budgets is None:
            raise ReportError(f"{exc} (or pass --budgets)") from None
        env_budgets = {}
    if args.prometheus is not None:
        if args.cost_per_hour is not None:
            raise ReportError("--cost-per-hour needs spans (--spans or --jaeger), not Prometheus")
        return prometheus_report(
            args.prometheus,
            service=args.service,
            window=args.window,
            budgets=args.budgets,
            default_budgets=env_budgets,
            exclude_cold_start=args.exclude_cold_start,
        )
    if args.jaeger is not None:
        spans = load_jaeger(
            args.jaeger, service=args.service or "", lookback=args.lookback, limit=args.limit
        )
        source = f"Jaeger at {args.jaeger.rstrip('/')} (service {args.service!r})"
    else:
        path = args.spans if args.spans is not None else default_spans_file()
        try:
            spans = load_spans_file(path)
        except ReportError as exc:
            if args.spans is not None:
                raise
            raise ReportError(
                f"{exc} (the default: pass --spans FILE or set {OTEL_INFERENCE_SPANS_FILE})"
            ) from None
        source = str(path)
    return build_report(
        spans,
        budgets=args.budgets,
        default_budgets=env_budgets,
        cost_per_hour=args.cost_per_hour,
        exclude_cold_start=args.exclude_cold_start,
        source=source,
    )


def _write(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot write {str(output)!r}: {exc.strerror or exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``otel-inference`` console script."""
    args = parser().parse_args(argv)
    try:
        report = make_report(args)
        _write(RENDERERS[args.format](report), args.output)
    except ReportError as exc:
        print(f"{PROG} report: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `| head`: not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    if args.output is not None:
        print(f"{PROG} report: wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
