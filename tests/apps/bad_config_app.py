"""Run under opentelemetry-instrument with one garbage setting: it must serve anyway."""

import json
import queue

from otel_inference import request, stage

work: queue.Queue = queue.Queue()
with request("embed"):
    with stage("tokenize"):
        work.put(json.dumps({"ok": True}))
    with stage("model_forward"):
        result = json.loads(work.get())
print(json.dumps(result))
