"""OpenTelemetry Collector configs (otelcol-contrib, pinned in ``collector.components``)
and their validator (``python -m collector.validate FILE...``)."""
