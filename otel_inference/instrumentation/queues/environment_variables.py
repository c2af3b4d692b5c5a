"""Environment variables read by the ``inference_queues`` instrumentor.

``instrument(scope=..., excluded_modules=...)`` arguments override them.
"""

OTEL_INFERENCE_QUEUES_SCOPE = "OTEL_INFERENCE_QUEUES_SCOPE"
"""
.. envvar:: OTEL_INFERENCE_QUEUES_SCOPE

Which enqueued items get a ``queue_wait`` stage: ``requests`` (default) records
only items put inside a request (a ``request()`` or any valid span, sampled or
not), since ``queue_wait`` is a stage of the producer's request; ``all`` records
every item of every instrumented queue (items put outside a request then record
like a stage outside a request, see ``OTEL_INFERENCE_ROOT_STAGES``).
"""

OTEL_INFERENCE_QUEUES_EXCLUDED_MODULES = "OTEL_INFERENCE_QUEUES_EXCLUDED_MODULES"
"""
.. envvar:: OTEL_INFERENCE_QUEUES_EXCLUDED_MODULES

Comma-separated module names (a name covers its submodules) whose queues are
never recorded, judged by the module that constructs the queue; added to the
built-in list (``opentelemetry``, ``otel_inference``, ``logging``, ``concurrent``,
``multiprocessing``, ``asyncio``, ``grpc``, ``urllib3``). Example:
``myservice.telemetry,vendor_sdk``.
"""
