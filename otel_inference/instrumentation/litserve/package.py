"""The library this instrumentor needs (extra ``otel-inference[litserve]``)."""

_instruments = ("litserve >= 0.2.10",)
