"""Environment variables read by the serializers instrumentor.

Registered through the ``opentelemetry_environment_variables`` entry point, so
each one is also an ``opentelemetry-instrument`` flag.
"""

OTEL_INFERENCE_SERIALIZERS_PARSE = "OTEL_INFERENCE_SERIALIZERS_PARSE"
"""
.. envvar:: OTEL_INFERENCE_SERIALIZERS_PARSE

Record request-body decoding (``json.loads``, ``orjson.loads``,
``msgpack.unpackb``) as a ``parse`` stage: ``true`` (default) or ``false``.
The ``parse=`` argument of ``SerializersInstrumentor().instrument()`` overrides it.
"""
