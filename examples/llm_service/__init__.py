"""A token-streaming LLM service (a tiny GPT-2 from a config) with no OpenTelemetry code.

Run it under ``opentelemetry-instrument`` (``make demo-llm`` does) and each request
is broken into stages, with ``generate`` split into ``prefill`` and ``decode`` and
the GenAI server metrics (time to first token, time per output token): see
docs/generation.md.

Modules: ``app`` (the FastAPI service, server-sent events), ``words`` (the made-up
vocabulary and deterministic prompts) and ``loadgen`` (a load generator that
measures time to first token on the client side).
"""
