"""``make demo-llm``: the token-streaming LLM service under ``opentelemetry-instrument``,
a load that measures time to first token on the client, the report, and the two TTFTs.

    .venv/bin/python -m examples.run_llm_demo            # from the repository root

1. starts ``examples/llm_service`` (a 4-layer GPT-2 from a config, random weights)
   under ``opentelemetry-instrument``: spans to ``build/llm-demo/spans.jsonl``,
   metrics on a Prometheus endpoint, TTFT/TPOT budgets set;
2. drives it with ``examples/llm_service/loadgen.py`` (closed loop, client-side TTFT
   per request, and the loopback round trip);
3. stops the service (which flushes its spans) and prints ``otel-inference report``;
4. compares the report's TTFT with the client's, p50 and p95: they must agree within
   5% plus the loopback round trip (the client's TTFT also holds the network and the
   hop from the model thread to the response); exit status 1 when they do not.

Writes ``build/llm-demo/agreement.json`` (both figures, the allowance, the verdict)
and ``client.json`` (per-request figures). Everything stays on 127.0.0.1 and every
process it started is stopped at the end. Options: ``--requests``,
``--concurrency``, ``--max-new-tokens``, ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from examples.run_demo import (
    LOCALHOST,
    ROOT,
    DemoError,
    Processes,
    free_port,
    http_get,
    instrumented_env,
    run_to_the_end,
    say,
    start_service,
)

BUDGETS = "ttft=2s,tpot=150ms,prefill=1s,decode=5s"
TOLERANCE = 0.05


def agreement(report_ttft: dict[str, float | None], client: dict[str, Any]) -> dict[str, Any]:
    """Report vs client TTFT at p50 and p95: |client - report| <= 5% x report + loopback."""
    rtt = client["loopback_rtt"]
    rows = {}
    for q in ("p50", "p95"):
        server, seen = report_ttft[q], client[f"ttft_{q}"]
        if server is None or seen is None:
            rows[q] = {"report": server, "client": seen, "ok": False}
            continue
        allowed = TOLERANCE * server + rtt
        rows[q] = {
            "report": server,
            "client": seen,
            "difference": seen - server,
            "relative": (seen - server) / server,
            "allowed": allowed,
            "ok": abs(seen - server) <= allowed,
        }
    return {
        "loopback_rtt": rtt,
        "tolerance": TOLERANCE,
        **rows,
        "ok": all(r["ok"] for r in rows.values()),
    }


def describe(result: dict[str, Any]) -> str:
    lines = [
        f"TTFT, report vs client (allowed: 5% of the report + loopback {result['loopback_rtt'] * 1000:.2f} ms):"
    ]
    for q in ("p50", "p95"):
        row = result[q]
        if row.get("difference") is None:
            lines.append(f"  {q}: missing ({row})")
            continue
        lines.append(
            f"  {q}: report {row['report'] * 1000:.1f} ms, client {row['client'] * 1000:.1f} ms, "
            f"difference {row['difference'] * 1000:+.1f} ms ({row['relative']:+.1%}), "
            f"allowed {row['allowed'] * 1000:.1f} ms: {'ok' if row['ok'] else 'NOT MET'}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from otel_inference.budgets import parse_budgets
    from otel_inference.report import build_report, load_spans_file, render_table

    started_at = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    spans = out / "spans.jsonl"
    spans.unlink(missing_ok=True)  # the exporter appends: one run per file
    processes = Processes()
    try:
        port, metrics_port = free_port(), free_port()
        service = start_service(
            processes,
            "examples.llm_service.app",
            port,
            instrumented_env(out, metrics_port, "llm-service", BUDGETS),
            out / "service.log",
            args.startup_timeout,
        )
        say(f"service ready on http://{LOCALHOST}:{port} (metrics :{metrics_port}/metrics)")

        client_json = out / "client.json"
        load = subprocess.run(
            [
                sys.executable,
                "-m",
                "examples.llm_service.loadgen",
                "--url",
                f"http://{LOCALHOST}:{port}",
                "--requests",
                str(args.requests),
                "--concurrency",
                str(args.concurrency),
                "--max-new-tokens",
                str(args.max_new_tokens),
                "--max-seconds",
                str(args.max_seconds),
                "--json",
                str(client_json),
            ],
            cwd=ROOT,
            check=False,
        )
        if load.returncode != 0:
            raise DemoError(f"the load generator failed (exit {load.returncode})")
        metrics = http_get(f"http://{LOCALHOST}:{metrics_port}/metrics").decode()
        if "gen_ai_server_time_to_first_token_seconds_bucket" not in metrics:
            raise DemoError("the metrics endpoint has no gen_ai_server_time_to_first_token")

        processes.stop(service)  # SIGTERM: uvicorn shuts down, the SDK flushes the spans
        if not spans.exists() or spans.stat().st_size == 0:
            raise DemoError(f"no spans were written to {spans}; see {out / 'service.log'}")
        report = build_report(load_spans_file(spans), budgets=parse_budgets(BUDGETS))
        print(render_table(report), flush=True)
        if report.generation is None or report.generation.ttft is None:
            raise DemoError("the report has no generation figures")
        client = json.loads(client_json.read_text())["summary"]
        ttft = report.generation.ttft
        result = agreement({"p50": ttft.p50, "p95": ttft.p95}, client)
        (out / "agreement.json").write_text(json.dumps(result, indent=1))
        print(describe(result), flush=True)
        say(f"demo finished in {time.monotonic() - started_at:.0f} s")
        return 0 if result["ok"] else 1
    finally:
        processes.stop_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the LLM streaming demo end to end.")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "llm-demo")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)

    return run_to_the_end(run, args)


if __name__ == "__main__":
    sys.exit(main())
