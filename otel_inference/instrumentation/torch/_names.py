"""Telemetry names of the torch instrumentor (``inference.*`` span attributes,
metrics). Shared names (stage names, ``inference.transfer.size``,
``inference.batch.size``) come from :mod:`otel_inference.semconv`."""

# model_forward span attributes
MODEL_CLASS = "inference.model.class"
INPUT_SHAPES = "inference.input.shapes"  # bounded list, e.g. ["input_ids:32x128"]
INPUT_DTYPE = "inference.input.dtype"
DEVICE = "inference.device"  # device of the first tensor input, e.g. "cuda:0"
GRAD_MODE = "inference.grad_mode"  # inference_mode | no_grad | grad
FORWARD_DEPTH = "inference.forward.depth"  # nested stages only (forward_depth > 1)

# Timing (model_forward and transfers)
TIMING_SOURCE = "inference.timing.source"  # see otel_inference.timing SOURCE_*
TIMING_FALLBACK_REASON = "inference.timing.fallback_reason"
HOST_DURATION = "inference.host.duration"  # s: host (launch) time of a device-timed stage

# Transfers
TRANSFER_DIRECTION = "inference.transfer.direction"  # h2d | d2h (metric label too)
TRANSFER_BYTES = "inference.transfer.bytes"
TRANSFER_PINNED = "inference.transfer.pinned"  # host-side tensor is page-locked
TRANSFER_NON_BLOCKING = "inference.transfer.non_blocking"
TRANSFER_SOURCE_DEVICE = "inference.transfer.source_device"
TRANSFER_TARGET_DEVICE = "inference.transfer.target_device"
TRANSFER_OPERATION = "inference.transfer.operation"  # to | cuda | cpu | copy_

# Sampled profile
PROFILE_ACTIVITIES = "inference.profile.activities"  # "cpu" | "cpu,cuda"
PROFILE_KERNEL_TIME = "inference.profile.kernel_time"  # s, device kernels (no memcpy)
PROFILE_MEMCPY_TIME = "inference.profile.memcpy_time"  # s, device memcpy/memset
PROFILE_OP_TIME = "inference.profile.op_time"  # s, CPU op self time
PROFILE_IDLE_TIME = "inference.profile.idle_time"  # s, gaps between kernels (CPU: top-level ops)
PROFILE_TOP_OPS = "inference.profile.top_ops"  # ["aten::addmm=812us", ...]
PROFILE_OP_COUNT = "inference.profile.op_count"

# Metrics
TIMING_FALLBACKS = "inference.timing.fallbacks"  # counter: device timing fell back to host
