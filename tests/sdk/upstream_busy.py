"""The official OpenAI Python SDK meeting tokenchat's 503 `upstream_busy`: every upstream of
the model is rate-limited, so the SDK must wait the `Retry-After` it was given and try again.

Run by tests/api/upstreams/busy.rs with BASE_URL and API_KEY set; prints one JSON line of
what it saw, and exits non-zero on any difference.
"""

import json
import os
import time

import openai

from sdk_retries import watch_retries

retries = watch_retries()

client = openai.OpenAI(base_url=os.environ["BASE_URL"], api_key=os.environ["API_KEY"], max_retries=2)
started = time.monotonic()
completion = client.chat.completions.create(
    model="llama3.2", messages=[{"role": "user", "content": "hello"}]
)
waited = time.monotonic() - started
content = completion.choices[0].message.content
assert content == "Echo: hello", content
assert retries.count >= 1, "the SDK never retried"
print(json.dumps({"content": content, "retries": retries.count, "waited": waited}))
