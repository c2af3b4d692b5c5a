"""Telemetry names shared by every instrumentor, dashboard, alert rule and the report.

Once a name is in a dashboard or an alert rule it is an interface: change it in
one commit across all of them. Prometheus names are in brackets.
"""

# Metrics
STAGE_DURATION = "inference.stage.duration"  # [inference_stage_duration_seconds]
STAGE_BUDGET = "inference.stage.budget"  # [inference_stage_budget_seconds]
STAGE_BUDGET_BREACHES = "inference.stage.budget.breaches"  # [..._breaches_total]
CACHE_LOOKUPS = "inference.cache.lookups"
TOKENS = "inference.tokens"
TRANSFER_SIZE = "inference.transfer.size"
BATCH_SIZE = "inference.batch.size"
SERIALIZE_SIZE = "inference.serialize.size"
# Per request and stage: how many calls the request made (N+1 patterns). Also the
# span attribute of a compressed span: how many calls it stands for.
STAGE_CALLS = "inference.stage.calls"  # [inference_stage_calls]
# Opt-in (OTEL_INFERENCE_STAGE_CALL_DURATION): the duration of every single call.
STAGE_CALL_DURATION = "inference.stage.call.duration"  # [..._call_duration_seconds]

# Attributes (metric labels and span attributes)
INFERENCE_STAGE = "inference.stage"
INFERENCE_STAGE_PARENT = "inference.stage.parent"
INFERENCE_BUDGET_EXCEEDED = "inference.budget.exceeded"
INFERENCE_BUDGET = "inference.budget"
INFERENCE_UNATTRIBUTED = "inference.unattributed.duration"
# request span: otel-inference's own time outside any stage (not counted as unattributed)
INFERENCE_INSTRUMENTATION = "inference.instrumentation.duration"
# true on cold requests and stages (span attribute and histogram label)
INFERENCE_COLD_START = "inference.cold_start"
INFERENCE_GC_PAUSE_DURATION = "inference.gc.pause.duration"  # request span: total s paused by GC
INFERENCE_GC_PAUSE_COUNT = "inference.gc.pause.count"
ERROR_TYPE = "error.type"
# Compressed span: the time its calls took (union of their intervals), seconds.
INFERENCE_STAGE_CALLS_DURATION = "inference.stage.calls.duration"
# Request span: stage calls past OTEL_INFERENCE_MAX_SPANS_PER_REQUEST (counted, not spanned),
# and the stages whose per-request time broke their budget.
INFERENCE_SPANS_DROPPED = "inference.spans.dropped"
INFERENCE_BUDGET_EXCEEDED_STAGES = "inference.budget.exceeded.stages"
# Cache lookups (feature hydration): per-key hit/miss counts on the stage span,
# and the result label of the CACHE_LOOKUPS counter.
CACHE_RESULT = "inference.cache.result"  # hit | miss
CACHE_HITS = "inference.cache.hits"
CACHE_MISSES = "inference.cache.misses"
CACHE_HIT_RATIO = "inference.cache.hit_ratio"
CACHE_FEATURE_GROUP = "inference.cache.feature_group"  # opt-in key prefix
CACHE_FEATURE_GROUPS = "inference.cache.feature_groups"  # span: the distinct groups

# Stage vocabulary: the serving path, in order. Custom names are allowed too.
QUEUE_WAIT = "queue_wait"
FEATURE_HYDRATION = "feature_hydration"
PREPROCESS = "preprocess"
TOKENIZE = "tokenize"
H2D_TRANSFER = "h2d_transfer"
MODEL_FORWARD = "model_forward"
D2H_TRANSFER = "d2h_transfer"
POSTPROCESS = "postprocess"
SERIALIZE = "serialize"
# Generation (LLM decoding): generate holds prefill (prompt -> first token) and
# decode (first token -> last), each recorded once per generation.
GENERATE = "generate"
PREFILL = "prefill"
DECODE = "decode"
STAGES = (
    QUEUE_WAIT,
    FEATURE_HYDRATION,
    PREPROCESS,
    TOKENIZE,
    H2D_TRANSFER,
    MODEL_FORWARD,
    GENERATE,
    PREFILL,
    DECODE,
    D2H_TRANSFER,
    POSTPROCESS,
    SERIALIZE,
)
# The dynamic batcher's shared work (otel_inference.batching): one span per batch,
# named apart from the stages nested in it (tokenize, model_forward, ...).
BATCH = "batch"
# Pseudo-stages recorded by request(): the whole request, and the part of it
# that no top-level stage covers.
REQUEST = "request"
UNATTRIBUTED = "unattributed"

# Batching and queues. STAGE_COST [inference_stage_cost_seconds] holds each member's
# share of a batched stage (duration / batch size), so its sum is the stage's real
# (device) time, never counted once per member; STAGE_DURATION keeps what each
# member experienced. Metric attributes: inference.stage (+ batcher name on batch metrics).
STAGE_COST = "inference.stage.cost"
BATCH_FILL_RATIO = "inference.batch.fill_ratio"  # batch size / max_batch_size
BATCH_FORMATION_DURATION = "inference.batch.formation.duration"  # s held open to fill
INFERENCE_BATCH_SIZE = "inference.batch.size"  # span attribute (same name as the metric)
INFERENCE_BATCH_MAX_SIZE = "inference.batch.max_size"
INFERENCE_BATCH_SHARE = "inference.batch.share"  # 1 / batch size, on member spans
INFERENCE_BATCHER_NAME = "inference.batcher.name"
INFERENCE_QUEUE_NAME = "inference.queue.name"
INFERENCE_QUEUE_KIND = "inference.queue.kind"  # queue.Queue | asyncio.Queue (type name)
INFERENCE_QUEUE_DEPTH = "inference.queue.depth"  # items ahead at enqueue

# Tokenize. The ``inference.tokens`` counter carries INFERENCE_TOKEN_KIND.
INFERENCE_TOKEN_KIND = "inference.token.kind"
TOKEN_KIND_REAL = "real"  # non-padding positions (attention mask 1)
TOKEN_KIND_PADDING = "padding"  # padding positions (attention mask 0)
# Span attributes of a tokenize stage. The same keys, with the latest tokenize
# call's figures, are left in the request bag (``current_request().attributes``)
# for the same request's model_forward.
INFERENCE_TOKENIZE_BATCH_SIZE = "inference.tokenize.batch_size"  # sequences out
INFERENCE_TOKENIZE_PADDED_LENGTH = "inference.tokenize.padded_length"  # longest row
INFERENCE_TOKENS_REAL = "inference.tokens.real"
INFERENCE_TOKENS_PADDED = "inference.tokens.padded"  # all positions (batch x padded length)
INFERENCE_PADDING_RATIO = "inference.padding.ratio"  # 1 - real / padded
INFERENCE_TOKENIZE_TRUNCATED = "inference.tokenize.truncated"  # sequences cut short

# Serialize / parse. ``inference.serialize.size`` carries the format.
PARSE = "parse"  # request-body decoding (json/orjson/msgpack loads): custom stage name
INFERENCE_SERIALIZE_FORMAT = "inference.serialize.format"  # json | msgpack
INFERENCE_SERIALIZE_LIBRARY = "inference.serialize.library"  # orjson, json, starlette...
INFERENCE_SERIALIZE_BYTES = "inference.serialize.bytes"
INFERENCE_PARSE_FORMAT = "inference.parse.format"
INFERENCE_PARSE_LIBRARY = "inference.parse.library"
INFERENCE_PARSE_BYTES = "inference.parse.bytes"

# Event loop (otel_inference.event_loop): time the loop could not run, on the
# stage and request spans it held; the report's ``event_loop`` row.
EVENT_LOOP = "event_loop"  # report row and verdict category
EVENT_LOOP_DELAY = "inference.runtime.event_loop.delay"  # [..._seconds] histogram
# Counter, s: time in held intervals (over the threshold), attr INFERENCE_EVENT_LOOP_BLOCKED_KIND
EVENT_LOOP_BLOCKED = "inference.runtime.event_loop.blocked"  # [..._seconds_total]
INFERENCE_EVENT_LOOP_BLOCKED = "inference.event_loop.blocked.duration"  # s, overlap with the span
INFERENCE_EVENT_LOOP_BLOCKED_COUNT = "inference.event_loop.blocked.count"
INFERENCE_EVENT_LOOP_BLOCKED_KIND = (
    "inference.event_loop.blocked.kind"  # busy|blocked|starved|unknown
)
INFERENCE_EVENT_LOOP_BLOCKED_CULPRIT = "inference.event_loop.blocked.culprit"
INFERENCE_STAGE_CPU = "inference.stage.cpu.duration"  # s on CPU (thread clock), sync stages
# Generation. Pseudo-stages of inference.stage.duration (no span, nested in
# generate) that budgets judge: time to first token and time per output token.
TTFT = "ttft"
TPOT = "tpot"
GENERATION_STAGES = (GENERATE, PREFILL, DECODE)
# OpenTelemetry GenAI semantic conventions (server metrics and their attributes).
GEN_AI_SERVER_TIME_TO_FIRST_TOKEN = "gen_ai.server.time_to_first_token"
GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN = "gen_ai.server.time_per_output_token"
GEN_AI_SERVER_REQUEST_DURATION = "gen_ai.server.request.duration"
GEN_AI_CLIENT_TOKEN_USAGE = "gen_ai.client.token.usage"
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"  # input | output
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"  # span attributes
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
# Span attributes of our generation stages.
INFERENCE_GENERATION_TTFT = "inference.generation.time_to_first_token"  # generate span, s
INFERENCE_GENERATION_TPOT = "inference.generation.time_per_output_token"  # generate span, s
INFERENCE_GENERATION_DECODE_STEPS = "inference.generation.decode.steps"  # decode span
INFERENCE_GENERATION_STREAMER = "inference.generation.streamer"  # generate span: bool
INFERENCE_GENERATION_STRATEGY = "inference.generation.strategy"  # greedy | sample | beam
