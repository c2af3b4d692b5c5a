"""The serving-framework instrumentors wrap and restore the frameworks' own
functions (no server started: see test_ray_serve.py and test_litserve.py)."""

from __future__ import annotations

import importlib

import pytest


def originals(targets: list[tuple[object, str]]) -> list[object]:
    return [vars(owner).get(name) for owner, name in targets]


@pytest.mark.parametrize(
    ("module", "instrumentor", "targets"),
    [
        (
            "ray.serve.batching",
            "otel_inference.instrumentation.ray_serve:RayServeInstrumentor",
            [
                ("ray.serve.batching:_BatchQueue", ("__init__", "put", "_process_batch_inner")),
                ("ray.serve._private.replica:Replica", ("_wrap_request",)),
            ],
        ),
        (
            "litserve.loops.base",
            "otel_inference.instrumentation.litserve:LitServeInstrumentor",
            [("litserve.loops.base:DefaultLoop", ("get_batch_requests", "put_response"))],
        ),
    ],
)
def test_instrument_wraps_and_uninstrument_restores(module, instrumentor, targets):
    pytest.importorskip(module, reason=f"{module.split('.')[0]} is not installed (serving extras)")
    owners = []
    for path, names in targets:
        module_name, _, cls = path.partition(":")
        owner = getattr(importlib.import_module(module_name), cls)
        owners.extend((owner, name) for name in names)
    before = originals(owners)
    module_name, _, cls = instrumentor.partition(":")
    instance = getattr(importlib.import_module(module_name), cls)()
    instance.instrument()
    try:
        for (owner, name), original in zip(owners, before, strict=True):
            assert getattr(owner, name) is not original, f"{owner.__name__}.{name} not wrapped"
            assert hasattr(getattr(owner, name), "__wrapped__")
    finally:
        instance.uninstrument()
    assert originals(owners) == before
