"""The library this instrumentor needs (extra ``otel-inference[ray-serve]``)."""

_instruments = ("ray >= 2.40",)
