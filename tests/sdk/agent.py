"""An agent framework as a second real client: a pydantic-ai agent, on OpenAI's Chat
Completions API pointed at tokenchat, calls its one tool and answers with what it said.

Run by tests/api/sdk.rs with BASE_URL and API_KEY set; exits non-zero with the failed
check's message on any difference.
"""

import os

from pydantic_ai import Agent
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

provider = OpenAIProvider(base_url=os.environ["BASE_URL"], api_key=os.environ["API_KEY"])
agent = Agent(
    OpenAIChatModel("llama3.2", provider=provider),
    instructions="Answer with the weather the tool gives.",
)
asked = []


@agent.tool_plain
def get_weather(city: str) -> str:
    """The weather in a city."""
    asked.append(city)
    return f"sunny in {city}"


result = agent.run_sync("What is the weather in Paris?")
assert asked == ["Paris"], asked
assert result.output == "Tool said: sunny in Paris", result.output
print("agent: every check passed")
