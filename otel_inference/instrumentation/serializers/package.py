"""The libraries this instrumentor wraps, each optional.

``_instruments`` is empty on purpose: stdlib ``json`` is always there, so the
instrumentor always loads, and each optional library below is wrapped only when
it is importable and within its range (checked when it is imported).
"""

_instruments: tuple[str, ...] = ()

_optional = {
    "orjson": "orjson >= 3.6",
    "msgpack": "msgpack >= 1.0",
    "starlette": "starlette >= 0.20",
    "fastapi": "fastapi >= 0.100",
}
