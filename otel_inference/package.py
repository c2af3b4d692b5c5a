"""The libraries otel-inference instruments (mirrors ``instruments-any`` in pyproject.toml).

Each instrumentor declares its own ``_instruments`` and checks only those, so a
missing library disables its own instrumentor and no other.
"""

_instruments_any = (
    "torch >= 2.1, < 3",
    "redis >= 4.2",
    "tokenizers >= 0.13",
    "transformers >= 4.30",
    "orjson >= 3.6",
    "msgpack >= 1.0",
)
