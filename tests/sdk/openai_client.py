"""The official OpenAI Python SDK against tokenchat, as a user points it there.

Run by tests/api/sdk.rs with BASE_URL, API_KEY, REVOKED_KEY and EMPTY_KEY set; exits
non-zero with the failed check's message on any difference.
"""

import logging
import os

import openai


class Retries(logging.Handler):
    """Counts the retries the SDK makes, from its own log."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record):
        # The SDK logs "Retrying request to ..." before each retry (and "Not retrying"
        # when it decides against one).
        if record.getMessage().startswith("Retrying"):
            self.count += 1


retries = Retries()
sdk_log = logging.getLogger("openai")
sdk_log.setLevel(logging.DEBUG)
sdk_log.addHandler(retries)

base_url = os.environ["BASE_URL"]

client = openai.OpenAI(base_url=base_url, api_key=os.environ["API_KEY"])

models = [model.id for model in client.models.list()]
assert "llama3.2" in models, models

answer = client.chat.completions.create(
    model="llama3.2",
    messages=[{"role": "user", "content": "hello sdk"}],
    temperature=0.5,
)
assert answer.object == "chat.completion", answer
assert answer.choices[0].message.role == "assistant", answer
assert answer.choices[0].message.content == "Echo: hello sdk", answer
assert answer.choices[0].finish_reason == "stop", answer
assert answer.usage.completion_tokens == 3, answer.usage

text, usage, ids = "", None, set()
stream = client.chat.completions.create(
    model="llama3.2",
    messages=[{"role": "user", "content": "streamed please"}],
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    ids.add(chunk.id)
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
    if chunk.usage:
        usage = chunk.usage
assert text == "Echo: streamed please", text
assert usage is not None and usage.completion_tokens == 3, usage
assert len(ids) == 1, ids

revoked = openai.OpenAI(base_url=base_url, api_key=os.environ["REVOKED_KEY"])
try:
    revoked.models.list()
    raise AssertionError("a revoked key was accepted")
except openai.AuthenticationError as error:
    assert error.status_code == 401, error

# A model that fails is a 502, which the SDK does retry: the count below can see retries.
retries.count = 0
once_more = openai.OpenAI(base_url=base_url, api_key=os.environ["API_KEY"], max_retries=1)
try:
    once_more.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "[fail] now"}]
    )
    raise AssertionError("a failing model was served")
except openai.APIStatusError as error:
    assert error.status_code == 502, error
    assert error.type == "api_error", error.body
assert retries.count >= 1, "the SDK did not retry a 502"

# An empty balance: a 402 the SDK raises at once, without retrying it.
retries.count = 0
empty = openai.OpenAI(base_url=base_url, api_key=os.environ["EMPTY_KEY"], max_retries=3)
try:
    empty.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "one more"}]
    )
    raise AssertionError("an empty balance was served")
except openai.APIStatusError as error:
    assert error.status_code == 402, error
    assert error.code == "insufficient_quota", error.body
assert retries.count == 0, f"the SDK retried {retries.count} times"

print("sdk: every check passed")
