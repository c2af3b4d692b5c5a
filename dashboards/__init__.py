"""Grafana dashboards, provisioning and Prometheus alert rules, generated from Python
(``python -m dashboards.generate``)."""
