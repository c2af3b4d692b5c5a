"""Attribute values that could explode are capped (issue 10).

Stage names in metric labels (tests/test_stages.py), Redis key-prefix groups
(tests/test_redis.py) and, here, the torch forward span's input shapes.
"""

from __future__ import annotations

import torch

from otel_inference import request
from otel_inference.instrumentation.torch import TorchInstrumentor, _names


class ManyInputs(torch.nn.Module):
    def forward(self, **tensors: torch.Tensor) -> torch.Tensor:
        return sum(tensor.sum() for tensor in tensors.values())


def test_forward_input_shapes_are_bounded(telemetry):
    TorchInstrumentor().instrument()
    try:
        inputs = {
            f"feature_with_a_very_long_generated_name_{index:03d}": torch.ones(2, index + 1)
            for index in range(20)
        }
        with request():
            ManyInputs()(**inputs)
    finally:
        TorchInstrumentor().uninstrument()
    (span,) = [
        s for s in telemetry.spans() if s.attributes.get("inference.stage") == "model_forward"
    ]
    shapes = span.attributes[_names.INPUT_SHAPES]
    assert 1 <= len(shapes) <= 8
    for shape in shapes:
        name, _, dims = shape.rpartition(":")
        assert len(name) <= 32 and dims.startswith("2x")
