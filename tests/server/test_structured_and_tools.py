"""Structured outputs and tool calls as real clients ask for them: the openai SDK and LangChain.

The tiny model's weights are random, so every valid answer here is the grammar's doing: the
server constrains decoding to the schema (response_format) or to a call of an offered tool
(tool_choice required / a named function). Strings and numbers in the schemas are bounded
(maxLength, minimum/maximum) so a random model's answer ends within its token budget.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from .conftest import ServerProcess

MESSAGES: list[Any] = [{"role": "user", "content": "Tell me about a person."}]
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=150)
    retired: bool


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_sdk_parse_returns_the_model_for_20_seeds(client: openai.OpenAI) -> None:
    for seed in range(20):
        reply = client.chat.completions.parse(model="tiny", messages=MESSAGES, response_format=Person, seed=seed, max_tokens=200)
        parsed = reply.choices[0].message.parsed
        assert isinstance(parsed, Person), reply
        assert reply.choices[0].finish_reason == "stop"


def test_json_object_answers_an_object_streamed_and_not(client: openai.OpenAI) -> None:
    # The random model can write one string past any max_tokens: take the first seed whose answer ends.
    for seed in range(10):
        reply = client.chat.completions.create(
            model="tiny", messages=MESSAGES, response_format={"type": "json_object"}, max_tokens=300, seed=seed
        )
        if reply.choices[0].finish_reason == "stop":
            break
    assert reply.choices[0].finish_reason == "stop", "no answer of 10 ended within 300 tokens"
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, response_format={"type": "json_object"}, max_tokens=300, seed=seed, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.choices[0].message.content


def test_a_schema_that_cannot_be_compiled_is_a_400(server: ServerProcess) -> None:
    schema = {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}, "required": ["a"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    body = {"model": "tiny", "messages": MESSAGES, "response_format": response_format}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def check_call(name: str, arguments: str) -> None:
    assert name in SCHEMAS
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_required_tool_choice_returns_a_valid_call(client: openai.OpenAI) -> None:
    for seed in range(5):
        reply = client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=200, temperature=1.0, seed=seed
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        check_call(call.function.name, call.function.arguments)


def test_required_tool_choice_streams_delta_tool_calls(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=200, seed=3)
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=200, seed=3, stream=True
    )
    names, arguments, reasons, content = "", "", [], ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                assert delta.index == 0
                names += delta.function.name or "" if delta.function else ""
                arguments += delta.function.arguments or "" if delta.function else ""
            reasons += [choice.finish_reason] if choice.finish_reason else []
    assert reasons == ["tool_calls"] and content == ""
    check_call(names, arguments)
    expected = reply.choices[0].message.tool_calls
    assert expected and (names, arguments) == (expected[0].function.name, expected[0].function.arguments)  # same seed, same call


def test_a_named_function_is_the_one_called(client: openai.OpenAI) -> None:
    for seed in range(3):
        reply = client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            max_tokens=100,
            seed=seed,
        )
        calls = reply.choices[0].message.tool_calls
        assert calls and [c.function.name for c in calls] == ["get_time"]
        check_call("get_time", calls[0].function.arguments)


def test_a_conversation_with_tool_results_goes_through_the_template(server: ServerProcess, client: openai.OpenAI, tokenizer: Any) -> None:
    messages: list[Any] = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="auto", max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason == "length"  # auto: the random model writes text, no call
    rendered = tokenizer.apply_chat_template(
        [
            messages[0],
            {**messages[1], "tool_calls": [{"type": "function", "function": {"name": "get_time", "arguments": {"zone": "UTC"}}}]},
            messages[2],
        ],
        tools=TOOLS,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>' in rendered
    assert "<tool_response>12:00</tool_response>" in rendered
    assert reply.usage is not None and reply.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False).input_ids)
    tokenized = httpx.post(server.url + "/tokenize", json={"messages": messages, "tools": TOOLS}, timeout=30).json()
    assert tokenized["count"] == reply.usage.prompt_tokens


def test_langchain_bind_tools_and_structured_output(server: ServerProcess) -> None:
    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="tiny", max_tokens=200, temperature=1.0, seed=7, max_retries=0)
    weather = {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}
    message = llm.bind_tools([weather], tool_choice="required").invoke("What is the weather in Paris?")
    assert isinstance(message, AIMessage) and len(message.tool_calls) == 1
    jsonschema.validate(message.tool_calls[0]["args"], WEATHER)
    named = llm.bind_tools([weather, {"name": "get_time", "description": "Current time", "parameters": TIME}], tool_choice="get_time")
    assert [call["name"] for call in named.invoke("What time is it?").tool_calls] == ["get_time"]
    person = llm.with_structured_output(Person).invoke("Describe a person.")
    assert isinstance(person, Person)


def test_tools_on_a_model_whose_template_has_none_are_a_400(stop_heavy_server: ServerProcess) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 4}
    refused = httpx.post(stop_heavy_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools", refused.text
    # tool_choice none: the tools are not offered, so the template need not know them.
    allowed = httpx.post(stop_heavy_server.url + "/v1/chat/completions", json={**body, "tool_choice": "none"}, timeout=60)
    assert allowed.status_code == 200, allowed.text


def test_constrained_rows_leave_the_free_rows_of_the_batch_alone(server: ServerProcess) -> None:
    free = {"model": "tiny", "messages": MESSAGES, "max_tokens": 40, "temperature": 0}
    alone = httpx.post(server.url + "/v1/chat/completions", json=free, timeout=60).json()["choices"][0]["message"]["content"]
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": Person.model_json_schema()}}

    async def together() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            constrained = [{**free, "response_format": schema, "max_tokens": 200, "seed": s, "temperature": 1.0} for s in range(6)]
            bodies = [free, *constrained, free]
            replies = await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))
            return [r.json()["choices"][0]["message"]["content"] for r in replies]

    texts = asyncio.run(together())
    assert texts[0] == texts[-1] == alone  # batched greedy output is what it is alone
    assert all(isinstance(Person.model_validate_json(text), Person) for text in texts[1:-1])
