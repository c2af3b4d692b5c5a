"""An all-MiniLM-L6-v2 embedding service with no OpenTelemetry code in it.

Run it under ``opentelemetry-instrument`` (``make demo`` does) and every request is
broken into stages by otel-inference's instrumentors: see docs/demo.md.

Modules: ``app`` (the FastAPI service), ``features`` (the per-user feature schema in
Redis), ``seed`` (writes those features), ``texts`` (synthetic, deterministic request
texts) and ``loadgen`` (a bounded load generator with steady and burst phases).
"""
