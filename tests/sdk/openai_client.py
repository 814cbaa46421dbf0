"""The official OpenAI Python SDK against tokenchat, as a user points it there.

Run by tests/api/sdk.rs with BASE_URL, API_KEY, REVOKED_KEY and EMPTY_KEY set; exits
non-zero with the failed check's message on any difference.
"""

import json
import os

import openai
import pydantic

from sdk_retries import watch_retries

retries = watch_retries()

base_url = os.environ["BASE_URL"]

client = openai.OpenAI(base_url=base_url, api_key=os.environ["API_KEY"])

models = [model.id for model in client.models.list()]
assert "llama3.2" in models, models
retrieved = client.models.retrieve("llama3.2")
assert (retrieved.id, retrieved.object, retrieved.owned_by) == ("llama3.2", "model", "tokenchat"), retrieved
# A served name holding "/", which this SDK sends as %2F.
retrieved = client.models.retrieve("meta-llama/Llama-3.1-8B")
assert retrieved.id == "meta-llama/Llama-3.1-8B", retrieved
try:
    client.models.retrieve("no-such-model")
    raise AssertionError("an unknown model was retrieved")
except openai.NotFoundError as err:
    assert err.code == "model_not_found", err

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

# A tool call round trip: the model asks, the client answers with a `tool` message, the
# model answers.
weather_tool = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
messages = [{"role": "user", "content": "what is the weather in Paris?"}]
asked = client.chat.completions.create(
    model="llama3.2", messages=messages, tools=[weather_tool], tool_choice="auto"
)
assert asked.choices[0].finish_reason == "tool_calls", asked
call = asked.choices[0].message.tool_calls[0]
assert call.function.name == "get_weather", call
assert json.loads(call.function.arguments) == {"city": "Paris"}, call
messages.append(asked.choices[0].message.model_dump(exclude_none=True))
messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"})
answered = client.chat.completions.create(model="llama3.2", messages=messages, tools=[weather_tool])
assert answered.choices[0].message.content == "Tool said: sunny, 21 C", answered
assert answered.choices[0].finish_reason == "stop", answered

# A streamed tool call, assembled from its deltas.
name, arguments, finish, pieces = "", "", None, 0
for chunk in client.chat.completions.create(
    model="llama3.2",
    messages=[{"role": "user", "content": "and in Rome?"}],
    tools=[weather_tool],
    stream=True,
):
    for choice in chunk.choices:
        for delta in choice.delta.tool_calls or []:
            name += delta.function.name or ""
            arguments += delta.function.arguments or ""
            pieces += 1
        finish = choice.finish_reason or finish
assert name == "get_weather", name
assert json.loads(arguments) == {"city": "Paris"}, arguments
assert pieces >= 3, pieces
assert finish == "tool_calls", finish


# Structured output: a JSON schema from a pydantic model, parsed by the SDK.
class Weather(pydantic.BaseModel):
    city: str
    temperature: float


parsed = client.chat.completions.parse(
    model="llama3.2",
    messages=[{"role": "user", "content": "the weather, as JSON"}],
    response_format=Weather,
)
weather = parsed.choices[0].message.parsed
assert weather == Weather(city="Paris", temperature=21.5), weather

# An image part goes through as sent.
seen = client.chat.completions.create(
    model="llama3.2",
    messages=[
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "describe this"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
        }
    ],
)
assert seen.choices[0].message.content == "Echo: describe this", seen

# Several choices.
several = client.chat.completions.create(
    model="llama3.2", messages=[{"role": "user", "content": "twice"}], n=2
)
assert [choice.index for choice in several.choices] == [0, 1], several
assert several.choices[1].message.content == "Echo 1: twice", several

# Embeddings: the SDK asks for base64 and decodes it.
embedded = client.embeddings.create(model="llama3.2", input=["hello world", "bye"])
assert [item.embedding for item in embedded.data] == [[2.0, 11.0, 0.5, -0.5], [1.0, 3.0, 0.5, -0.5]], embedded
assert embedded.usage.prompt_tokens == 3, embedded.usage


def refused(key, retries_allowed, message):
    """The error a chat of `message` with `key` is answered with, and how often the SDK,
    allowed `retries_allowed` retries, retried it."""
    retries.count = 0
    sdk = openai.OpenAI(base_url=base_url, api_key=key, max_retries=retries_allowed)
    try:
        sdk.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": message}])
    except openai.APIStatusError as error:
        return error, retries.count
    raise AssertionError(f"{message!r} was served")


# A request the model rejects: BadRequestError, at once, never retried.
error, retried = refused(os.environ["API_KEY"], 3, "[reject] this schema")
assert isinstance(error, openai.BadRequestError) and error.status_code == 400, error
assert "Invalid schema for function 'get_weather'" in error.message, error.message
assert error.code == "invalid_function_parameters", error.body
assert retried == 0, f"the SDK retried a rejection {retried} times"

revoked = openai.OpenAI(base_url=base_url, api_key=os.environ["REVOKED_KEY"])
try:
    revoked.models.list()
    raise AssertionError("a revoked key was accepted")
except openai.AuthenticationError as error:
    assert error.status_code == 401, error

# A model that fails is a 502, which the SDK does retry.
error, retried = refused(os.environ["API_KEY"], 1, "[fail] now")
assert error.status_code == 502 and error.type == "api_error", error.body
assert retried >= 1, "the SDK did not retry a 502"

# A model past its time-out: a 504 the SDK raises at once (x-should-retry: false), though it
# retries every other 5xx: the operator may have paid for the call, which would likely be as
# slow again.
error, retried = refused(os.environ["API_KEY"], 2, "[stall] now")
assert error.status_code == 504 and error.code == "upstream_timeout", error.body
assert retried == 0, f"the SDK retried a time-out {retried} times"

# An empty balance: a 402 the SDK raises at once, without retrying it.
error, retried = refused(os.environ["EMPTY_KEY"], 3, "one more")
assert error.status_code == 402 and error.code == "insufficient_quota", error.body
assert retried == 0, f"the SDK retried {retried} times"

print("sdk: every check passed")
