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

OTEL_INFERENCE_MAX_SPANS_PER_REQUEST = "OTEL_INFERENCE_MAX_SPANS_PER_REQUEST"
"""
.. envvar:: OTEL_INFERENCE_MAX_SPANS_PER_REQUEST

Most stage spans one request makes (default 500, as Elastic APM's
``transaction_max_spans``). Later calls are still timed and counted in the
request's stage totals, only not spanned; the request span carries
``inference.spans.dropped``. ``0`` makes no stage spans inside requests.
"""

OTEL_INFERENCE_SPAN_COMPRESSION_THRESHOLD = "OTEL_INFERENCE_SPAN_COMPRESSION_THRESHOLD"
"""
.. envvar:: OTEL_INFERENCE_SPAN_COMPRESSION_THRESHOLD

Consecutive calls of one stage in one request, each successful, within its budget
and at most this long (default ``50ms``, as Elastic APM's exact-match
compression), share one span carrying ``inference.stage.calls`` and
``inference.stage.calls.duration``. A failing, over-budget or longer call always
gets its own span. ``0ms`` turns compression off.
"""

OTEL_INFERENCE_STAGE_CALL_DURATION = "OTEL_INFERENCE_STAGE_CALL_DURATION"
"""
.. envvar:: OTEL_INFERENCE_STAGE_CALL_DURATION

``true`` also records the duration of every single stage call, inside requests
too, into the ``inference.stage.call.duration`` histogram (per-call Redis
latency, say). Default ``false``: ``inference.stage.duration`` holds what each
request spent in each stage, and ``inference.stage.calls`` how many calls that took.
"""

OTEL_INFERENCE_METRICS_FAST_PATH = "OTEL_INFERENCE_METRICS_FAST_PATH"
"""
.. envvar:: OTEL_INFERENCE_METRICS_FAST_PATH

``true`` (default): when the otel-inference configurator sets up metrics (under
``opentelemetry-instrument``, exporters ``otlp``, ``console`` or ``prometheus``),
otel-inference's histograms and counters are aggregated in-process (~1 us a record
instead of ~10 us) and exported by the same readers, with the same output.
``false`` records them through the SDK, as any other instrument.
"""

OTEL_INFERENCE_SPEEDUPS = "OTEL_INFERENCE_SPEEDUPS"
"""
.. envvar:: OTEL_INFERENCE_SPEEDUPS

``true`` (default): stages run on the compiled hot path (``otel_inference._speedups``,
built at install when a C compiler and the Python headers are there; ~0.5 us a repeated
stage call instead of ~2 us). ``false``, or not built: the pure-Python core, with the
same behaviour. Read once, at import.
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

OTEL_INFERENCE_EVENT_LOOP_THRESHOLD = "OTEL_INFERENCE_EVENT_LOOP_THRESHOLD"
"""
.. envvar:: OTEL_INFERENCE_EVENT_LOOP_THRESHOLD

An asyncio event loop held at least this long (``us``, ``ms`` or ``s``, from
``5ms`` to ``60s``; default ``20ms``) is a blocked interval: the runtime instrumentor's watchdog names what
held it (the callback's function, or the threads that took the CPU/GIL), and
the stages and requests it overlapped get the overlap
(``inference.event_loop.blocked.duration``) and an ``event_loop.blocked`` event.
Every heartbeat's lateness goes into ``inference.runtime.event_loop.delay``.
"""
