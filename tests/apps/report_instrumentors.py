"""Run under opentelemetry-instrument: print which otel-inference instrumentors loaded."""

import importlib.util
import json
import os
from importlib.metadata import entry_points

state = {}
for entry_point in entry_points(group="opentelemetry_instrumentor"):
    if not entry_point.value.startswith("otel_inference"):
        continue
    try:
        instrumentor = entry_point.load()
    except ImportError as exc:
        state[entry_point.name] = f"import failed: {exc}"
        continue
    state[entry_point.name] = instrumentor()._is_instrumented_by_opentelemetry

print(
    json.dumps(
        {
            "instrumented": state,
            "torch_found": importlib.util.find_spec("torch") is not None,
            "budgets_env": os.environ.get("OTEL_INFERENCE_BUDGETS"),
        }
    )
)
