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
