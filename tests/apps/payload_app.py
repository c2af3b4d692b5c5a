"""Run under opentelemetry-instrument with every instrumentor: push known secrets
through each instrumented path. The test scans everything exported for them."""

import contextlib
import json
import logging
import os
import queue
import sys

import orjson
import redis
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from otel_inference import request, stage

SECRETS = json.loads(os.environ["PAYLOAD_SECRETS"])
client = redis.Redis.from_url(os.environ["PAYLOAD_REDIS_URL"])
client.set(f"user:{SECRETS['key']}", SECRETS["value"])

tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer.train_from_iterator(
    [SECRETS["text"], "plain words only"],
    trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]),
)
tokenizer.enable_padding(pad_id=1, pad_token="[PAD]")
work: queue.Queue = queue.Queue()

for _ in range(3):
    with request("embed"):
        client.get(f"user:{SECRETS['key']}")  # hit
        client.mget([f"user:{SECRETS['key']}", f"missing:{SECRETS['key']}"])
        encodings = tokenizer.encode_batch([SECRETS["text"], "plain"])
        work.put({"text": SECRETS["text"], "ids": encodings[0].ids})
        item = work.get()
        try:
            with stage("model_forward"):
                raise ValueError(f"bad input {SECRETS['text']} for {SECRETS['key']}")
        except ValueError:
            pass
        with contextlib.suppress(redis.ResponseError):
            client.hget(f"user:{SECRETS['key']}", "field")  # WRONGTYPE: echoes no key
        body = orjson.dumps({"text": item["text"], "value": SECRETS["value"]})
        json.loads(body)
logging.getLogger("app").warning("the app's own log line, no secrets")
print("done", flush=True)
sys.exit(0)
