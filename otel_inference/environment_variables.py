"""Environment variables read by otel-inference.

Registered through the ``opentelemetry_environment_variables`` entry point, so
each one is also an ``opentelemetry-instrument`` flag: ``OTEL_INFERENCE_BUDGETS``
becomes ``--inference_budgets``.
"""

OTEL_INFERENCE_BUDGETS = "OTEL_INFERENCE_BUDGETS"
"""
.. envvar:: OTEL_INFERENCE_BUDGETS

Per-stage latency budgets, ``stage=value`` pairs separated by commas, each value
with a unit (``us``, ``ms`` or ``s``): ``tokenize=5ms,model_forward=14ms,request=200ms``.
"""

OTEL_INFERENCE_BUDGETS_FILE = "OTEL_INFERENCE_BUDGETS_FILE"
"""
.. envvar:: OTEL_INFERENCE_BUDGETS_FILE

Path of a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file holding budgets as a
mapping ``stage: "5ms"``, at top level or under a ``budgets`` key. Entries in
:envvar:`OTEL_INFERENCE_BUDGETS` override the file's.
"""

OTEL_INFERENCE_ROOT_STAGES = "OTEL_INFERENCE_ROOT_STAGES"
"""
.. envvar:: OTEL_INFERENCE_ROOT_STAGES

What a stage outside any request (no current span: a worker thread, warm-up,
a script) produces besides its histogram: ``span`` (default) starts a root span
that the sampler may keep; ``metrics`` records the histogram only.
"""

OTEL_INFERENCE_EXCEPTION_MESSAGES = "OTEL_INFERENCE_EXCEPTION_MESSAGES"
"""
.. envvar:: OTEL_INFERENCE_EXCEPTION_MESSAGES

``true`` records exception messages on stage spans (``exception.message``, the
status description). Default ``false``: messages often quote payload (a key, an
input text), so only ``exception.type``, the stack frames and ``error.type``
are recorded.
"""

OTEL_INFERENCE_COLD_START_REQUESTS = "OTEL_INFERENCE_COLD_START_REQUESTS"
"""
.. envvar:: OTEL_INFERENCE_COLD_START_REQUESTS

How many requests after process start are flagged ``inference.cold_start=true``
(default 10; ``0`` turns flagging off). Stages before the process is warm
(model load, warm-up, the first torch.compile) are flagged too.
"""

OTEL_INFERENCE_GC_EVENT_THRESHOLD = "OTEL_INFERENCE_GC_EVENT_THRESHOLD"
"""
.. envvar:: OTEL_INFERENCE_GC_EVENT_THRESHOLD

GC pauses at least this long (``us``, ``ms`` or ``s``; default ``1ms``), and every
generation-2 pause, become a ``gc.pause`` event on the spans of the requests in
flight. Every pause counts in the per-request totals and the histogram.
"""

OTEL_INFERENCE_GC_FREEZE = "OTEL_INFERENCE_GC_FREEZE"
"""
.. envvar:: OTEL_INFERENCE_GC_FREEZE

``true`` calls ``gc.freeze()`` when the process is marked warm
(:func:`otel_inference.runtime.mark_warm` or the end of the cold-start window),
moving everything allocated so far (a loaded model's hundreds of thousands of
objects) out of the collector's reach, so full collections stop rescanning
them. Default ``false``.
"""

OTEL_INFERENCE_DOWNSTREAM = "OTEL_INFERENCE_DOWNSTREAM"
"""
.. envvar:: OTEL_INFERENCE_DOWNSTREAM

``true`` (default): CLIENT spans of the contrib HTTP/gRPC client
instrumentations (requests, httpx, aiohttp-client, urllib, urllib3, grpc) made
inside a request also record a ``downstream`` stage. ``false`` leaves their
tracers untouched.
"""

OTEL_INFERENCE_SPANS_FILE = "OTEL_INFERENCE_SPANS_FILE"
"""
.. envvar:: OTEL_INFERENCE_SPANS_FILE

Path of a local file that also receives every finished span, one OTLP JSON
object per line (JSON Lines, exactly as ``FileSpanExporter`` of the package
``opentelemetry-exporter-otlp-json-file`` writes them; the file is appended to,
never truncated). Under ``opentelemetry-instrument`` our configurator adds a
``BatchSpanProcessor(FileSpanExporter(path))`` to the tracer provider it set up,
next to the exporters of ``OTEL_TRACES_EXPORTER`` (``none`` leaves the file as
the only destination). ``otel-inference report --spans`` reads this file and
defaults to this variable. Unset (default): no file. A directory, a missing
parent directory, an unwritable path or a missing exporter package is logged
at ERROR at startup and the application starts without the file.
"""

OTEL_INFERENCE_PROMETHEUS_PORTS = "OTEL_INFERENCE_PROMETHEUS_PORTS"
"""
.. envvar:: OTEL_INFERENCE_PROMETHEUS_PORTS

With ``OTEL_METRICS_EXPORTER=prometheus``: how many consecutive ports, from
``OTEL_EXPORTER_PROMETHEUS_PORT`` up, the processes of one server may serve
metrics on. Each process (the parent of ``uvicorn --workers`` or gunicorn, and
every worker) takes the first free one and serves only its own measurements;
scrape the whole range. Default ``1``: the base port only. A port already in
use is logged at ERROR once, naming the variable; the process keeps its traces
and other exporters.
"""
