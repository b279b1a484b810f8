"""The Responses API on the real default model, driven by the real ``openai`` client.

Greedy answers are checked against the chat route for the same conversation: a
response is a chat completion in another shape, and must add nothing and lose nothing.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from cholla.errors import ChollaError
from cholla.serve.errors import APIError
from cholla.serve.responses_api import ResponseStore, StoredResponse
from tests.test_serve import MODEL, _wait_idle, client, live  # noqa: F401  (module fixtures)

QUESTION = "Tell me about deserts."
WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
                          "additionalProperties": False}}
FORCED = {"type": "function", "name": "get_weather"}


def _chat(client, messages: list[dict], max_tokens: int) -> str:
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens)
    return reply.choices[0].message.content


def test_create_equals_the_chat_route(client):
    response = client.responses.create(model=MODEL, input=QUESTION, instructions="Answer briefly.", temperature=0,
                                       max_output_tokens=8)
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}])
    assert response.output_text == chat.choices[0].message.content
    assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL
    assert [item.type for item in response.output] == ["message"]
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == 8 and response.usage.total_tokens == chat.usage.total_tokens
    assert response.instructions == "Answer briefly." and response.max_output_tokens == 8

    # Items instead of a string: message items with input_text / output_text parts, developer for system.
    items = [{"role": "developer", "content": "Answer briefly."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]}]
    assert client.responses.create(model=MODEL, input=items, temperature=0, max_output_tokens=8).output_text \
        == response.output_text


def test_stream_events(client):
    expected = _chat(client, [{"role": "user", "content": QUESTION}], 8)
    events = list(client.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=8, stream=True))
    types = [event.type for event in events]
    assert types[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    item_id = events[2].item.id
    assert all(d.item_id == item_id and d.output_index == 0 and d.content_index == 0 for d in deltas)
    assert "".join(d.delta for d in deltas) == expected == events[-4].text
    final = events[-1].response
    assert final.output_text == expected and final.output[0].id == item_id and final.usage.output_tokens == 8
    assert events[-2].item.status == final.output[0].status == "incomplete"

    # The SDK's own accumulator agrees.
    with client.responses.stream(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=8) as stream:
        texts = [event.delta for event in stream if event.type == "response.output_text.delta"]
    assert "".join(texts) == expected


def test_previous_response_id_store_and_retrieve(client):
    first = client.responses.create(model=MODEL, input=QUESTION, instructions="Answer briefly.", temperature=0,
                                    max_output_tokens=6)
    second = client.responses.create(model=MODEL, input="And the sea?", previous_response_id=first.id, temperature=0,
                                     max_output_tokens=6)
    # The earlier turns come back; the earlier instructions do not (as OpenAI does).
    expected = _chat(client, [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first.output_text},
                              {"role": "user", "content": "And the sea?"}], 6)
    assert second.output_text == expected and second.previous_response_id == first.id
    # Streamed responses are stored too.
    streamed = list(client.responses.create(model=MODEL, input="Hi", temperature=0, max_output_tokens=4, stream=True))
    assert client.responses.retrieve(streamed[-1].response.id).output_text == streamed[-1].response.output_text

    assert client.responses.retrieve(second.id).output_text == second.output_text
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError, match=second.id):
        client.responses.retrieve(second.id)

    unstored = client.responses.create(model=MODEL, input=QUESTION, store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError, match="store=false"):
        client.responses.create(model=MODEL, input="More", previous_response_id=unstored.id)


def test_errors_are_typed(live, client):
    missing = httpx.post(f"{live.url}/v1/responses", json={"model": MODEL, "input": "Hi", "previous_response_id": "resp_x"})
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error" and "resp_x" in missing.json()["error"]["message"]
    cases = [
        (dict(input="Hi", extra_body={"frobnicate": 1}), "frobnicate"),
        (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]), "input_image"),
        (dict(input=[{"type": "function_call", "name": "f", "arguments": "{}"}]), "call_id"),
        (dict(input="Hi", tools=[{"type": "web_search"}]), "tools"),
        (dict(input="Hi", tools=[WEATHER], tool_choice={"type": "function", "name": "get_time"}), "get_time"),
        (dict(input="Hi", tools=[WEATHER], tool_choice="required", text={"format": {"type": "json_object"}}),
         "text.format"),
        (dict(input="Hi", text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}),
         "text.format.schema.*nonsense"),
        (dict(input="Hi", text={"format": {"type": "json_schema", "name": "x"}}), "schema"),
        (dict(input="Hi", conversation="conv_1"), "conversation"),
        (dict(input="Hi", background=True), "background"),
        (dict(input="Hi", temperature=-1), "temperature"),
        (dict(input="word " * 600), "context length"),
        (dict(input=[]), "input"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(openai.BadRequestError, match=needle):
            client.responses.create(model=MODEL, **kwargs)
    with pytest.raises(openai.NotFoundError, match=MODEL):
        client.responses.create(model="gpt-5", input="Hi")
    _wait_idle(live)


def test_store_keeps_the_most_recently_used():
    store = ResponseStore(capacity=2)
    for name in ("a", "b"):
        store.put(name, StoredResponse({"id": name}, []))
    store.get("a")  # now b is the least recently used
    store.put("c", StoredResponse({"id": "c"}, []))
    assert store.get("a").body == {"id": "a"} and store.get("c").body == {"id": "c"}
    with pytest.raises(APIError, match="2 most recent") as error:
        store.get("b")
    assert error.value.status == 404
    with pytest.raises(ChollaError, match="--max-stored-responses must be at least 1"):
        ResponseStore(capacity=0)


def test_function_tools_streamed_and_not(client):
    """A forced call: a function_call item whose arguments fit the schema; the stream's deltas rebuild the same call."""
    ask = dict(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER], tool_choice=FORCED, temperature=0,
               max_output_tokens=48)
    response = client.responses.create(**ask)
    assert [item.type for item in response.output] == ["function_call"] and response.status == "completed"
    call = response.output[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert isinstance(json.loads(call.arguments)["city"], str)
    assert response.tools[0].name == "get_weather" and response.tool_choice.name == "get_weather"

    events = list(client.responses.create(stream=True, **ask))
    types = [e.type for e in events]
    assert types[2] == "response.output_item.added" and events[2].item.type == "function_call"
    assert types[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == events[-3].arguments == call.arguments
    assert events[-1].response.output[0].name == "get_weather"


def test_function_call_round_trip_equals_the_chat_route(client):
    """Call, result, answer: the items render as the chat route's tool messages and give the same greedy answer."""
    question = "What is the weather in Paris?"
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    result = {"type": "function_call_output", "call_id": "call_1", "output": "18 C and sunny"}
    response = client.responses.create(model=MODEL, input=[{"role": "user", "content": question}, call, result],
                                       tools=[WEATHER], temperature=0, max_output_tokens=8)
    chat_tool = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
    chat = client.chat.completions.create(model=MODEL, tools=[chat_tool], temperature=0, max_tokens=8, messages=[
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}])
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens

    # Chained through the store: the call and its output come back as the same conversation.
    first = client.responses.create(model=MODEL, input=question, tools=[WEATHER], tool_choice=FORCED, temperature=0,
                                    max_output_tokens=48)
    made = first.output[0]
    chained = client.responses.create(model=MODEL, previous_response_id=first.id, tools=[WEATHER], temperature=0,
                                      max_output_tokens=8, input=[{"type": "function_call_output", "call_id": made.call_id,
                                                                   "output": "18 C and sunny"}])
    replayed = client.responses.create(model=MODEL, tools=[WEATHER], temperature=0, max_output_tokens=8, input=[
        {"role": "user", "content": question}, made.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": made.call_id, "output": "18 C and sunny"}])
    assert chained.output_text == replayed.output_text


def test_text_format_json_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}
    response = client.responses.create(model=MODEL, input="The capital of France, as JSON.", temperature=0,
                                       max_output_tokens=40,
                                       text={"format": {"type": "json_schema", "name": "capital", "schema": schema}})
    assert response.status == "completed"
    value = json.loads(response.output_text)
    assert list(value) == ["city"] and isinstance(value["city"], str) and len(value["city"]) <= 12
    assert response.text.format.type == "json_schema"
    anything = client.responses.create(model=MODEL, input="A JSON object, please.", temperature=0, max_output_tokens=4,
                                       text={"format": {"type": "json_object"}})
    assert anything.output_text.lstrip().startswith("{")  # the grammar allows nothing else first


def test_openai_agents_runs_a_function_tool(live):
    """openai-agents on its default model (OpenAIResponsesModel): the tool is called, its result read, a final answer."""
    import agents  # openai-agents (test extras)

    agents.set_tracing_disabled(True)
    calls = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"18 C and sunny in {city}"

    async def run() -> tuple[str, str]:
        async_client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        # SmolLM2-135M seldom calls a tool on its own: the first turn names it (agents resets it to auto afterwards).
        settings = agents.ModelSettings(temperature=0, max_tokens=128, tool_choice="get_weather")
        agent = agents.Agent(name="weather", instructions="Answer in one sentence.", tools=[get_weather],
                             model=agents.OpenAIResponsesModel(MODEL, async_client), model_settings=settings)
        try:
            result = await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=3)
            streamed = agents.Runner.run_streamed(agent, "What is the weather in Paris?", max_turns=3)
            async for _ in streamed.stream_events():
                pass
            return result.final_output, streamed.final_output
        finally:
            await async_client.close()

    final, streamed_final = asyncio.run(run())
    assert len(calls) == 2 and all(isinstance(city, str) and city for city in calls)
    assert isinstance(final, str) and final and streamed_final == final


def test_stream_hang_up_aborts(live):
    body = {"model": MODEL, "input": QUESTION, "max_output_tokens": 400, "stream": True, "store": False}
    with httpx.stream("POST", f"{live.url}/v1/responses", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["type"] == "response.output_text.delta":
                break  # hang up after the first piece of text
    _wait_idle(live)
