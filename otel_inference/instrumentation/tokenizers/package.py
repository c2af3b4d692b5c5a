"""The library this instrumentor needs; transformers is instrumented too when installed."""

_instruments = ("tokenizers >= 0.13",)

# Instrumented when importable (it depends on tokenizers, so it never comes alone).
_transformers = "transformers >= 4.30"
