"""Structured output and tool calls with the official `openai` client against
real workers on the default model (SmolLM2-135M-Instruct).

The grammar, not the model, makes the output valid: even this 135M model
returns JSON that parses and tool calls that match their schemas. One server
is shared by the module (starting one costs ~10 s here).
"""

from __future__ import annotations

import json
import threading
from enum import Enum
from typing import Optional

import openai
import pytest
from pydantic import BaseModel, Field

from _server import Server

pytestmark = pytest.mark.model


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: str = Field(max_length=24)
    zip_code: Optional[str] = Field(max_length=8)


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=150)
    favourite: Color
    nickname: Optional[str] = Field(max_length=16)
    address: Address
    hobbies: list[str] = Field(max_length=3)


class Weather(BaseModel):
    city: str = Field(max_length=24)
    unit: Optional[Color]


@pytest.fixture(scope="module")
def server():
    s = Server(None, "--workers", "1")
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


ASK = [{"role": "user", "content": "Describe a fictional person."}]

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                   "required": ["city"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 24}},
                   "required": ["zone"], "additionalProperties": False}}}
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("temperature,seed", [(0, None), (1.0, 2)])
def test_parse_pydantic_always_parses(client, temperature, seed):
    r = client.chat.completions.parse(model="default", messages=ASK, response_format=Person,
                                      temperature=temperature, seed=seed, max_tokens=400)
    c = r.choices[0]
    assert c.finish_reason == "stop", c
    p = c.message.parsed
    assert isinstance(p, Person) and isinstance(p.address, Address) and isinstance(p.favourite, Color)
    assert len(p.hobbies) <= 3
    assert Person.model_validate_json(c.message.content) == p


def test_json_object(client):
    # json_object bounds neither depth nor length: a prompt that asks for a
    # small object (asked to describe a person, this model nests forever).
    ask = [{"role": "user", "content": 'Return a JSON object with the keys "name" and "age" of a person.'}]
    r = client.chat.completions.create(model="default", messages=ask, max_tokens=150, temperature=0,
                                       response_format={"type": "json_object"})
    c = r.choices[0]
    assert c.finish_reason == "stop", c
    assert isinstance(json.loads(c.message.content), dict)


def test_small_max_tokens_is_length(client):
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model="default", messages=ASK, response_format=Person, max_tokens=5)


def test_bad_schema_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=ASK, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}})
    assert "invalid JSON schema" in str(e.value) and "objectx" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:  # llguidance refuses look-behind
        client.chat.completions.create(model="default", messages=ASK, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}}})
    assert "look-around" in str(e.value)


def test_unknown_tool_name_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=WEATHER_ASK, max_tokens=8, tools=[WEATHER_TOOL],
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert "get_time" in str(e.value)


def _check_weather_call(tc):
    assert tc.type == "function" and tc.id.startswith("call_")
    assert tc.function.name == "get_weather"
    args = json.loads(tc.function.arguments)
    assert set(args) == {"city"} and isinstance(args["city"], str)


def test_named_tool_choice_and_tool_result_round_trip(client):
    r = client.chat.completions.create(model="default", messages=WEATHER_ASK, max_tokens=100, temperature=0,
                                       tools=[WEATHER_TOOL, TIME_TOOL],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert c.message.content is None and len(c.message.tool_calls) == 1
    tc = c.message.tool_calls[0]
    _check_weather_call(tc)
    # The call and its result go back into the conversation.
    history = WEATHER_ASK + [c.message.model_dump(exclude_none=True),
                             {"role": "tool", "tool_call_id": tc.id, "content": '{"temp_c": 21, "sky": "sunny"}'}]
    r2 = client.chat.completions.create(model="default", messages=history, max_tokens=40, temperature=0,
                                        tools=[WEATHER_TOOL, TIME_TOOL])
    c2 = r2.choices[0]
    assert c2.finish_reason in ("stop", "length", "tool_calls")
    assert c2.message.content or c2.message.tool_calls
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens  # the call and its result were rendered


def test_required_tool_choice_streamed(client):
    # .stream() assembles the deltas (id, type, name once; arguments concatenated)
    # and parses the arguments of a strict pydantic tool.
    tool = openai.pydantic_function_tool(Weather, name="get_weather")
    with client.chat.completions.stream(model="default", messages=WEATHER_ASK, max_tokens=100, temperature=0,
                                        tools=[tool], tool_choice="required",
                                        parallel_tool_calls=False) as s:
        events = [e.type for e in s]
        final = s.get_final_completion()
    c = final.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert len(c.message.tool_calls) == 1
    tc = c.message.tool_calls[0]
    assert tc.id.startswith("call_") and tc.function.name == "get_weather"
    assert isinstance(tc.function.parsed_arguments, Weather)
    assert "tool_calls.function.arguments.done" in events
    # Not streamed, the same greedy call.
    r = client.chat.completions.create(model="default", messages=WEATHER_ASK, max_tokens=100, temperature=0,
                                       tools=[tool], tool_choice="required", parallel_tool_calls=False)
    assert r.choices[0].message.tool_calls[0].function.arguments == tc.function.arguments


def test_required_parallel_calls_are_valid(client):
    # Parallel calls allowed: the small model may keep calling until max_tokens,
    # but every call it completes matches a tool's schema.
    r = client.chat.completions.create(model="default", messages=WEATHER_ASK, max_tokens=120, temperature=1.0, seed=3,
                                       tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")
    c = r.choices[0]
    assert c.finish_reason in ("tool_calls", "length")
    assert c.message.tool_calls
    ids = [tc.id for tc in c.message.tool_calls]
    assert len(set(ids)) == len(ids)
    for tc in c.message.tool_calls:
        args = json.loads(tc.function.arguments)
        assert (tc.function.name, set(args)) in (("get_weather", {"city"}), ("get_time", {"zone"}))


def test_mixed_batch_join_and_cancel(client):
    """Constrained and free requests decode in one batch: one joins mid-decode,
    one is cancelled; the others finish correctly."""
    results: dict[str, object] = {}
    first_chunk = threading.Event()

    def free_stream():
        s = client.chat.completions.create(model="default", messages=ASK, max_tokens=120, temperature=0, stream=True)
        text = ""
        for ch in s:
            first_chunk.set()
            for c in ch.choices:
                text += c.delta.content or ""
        results["free"] = text

    def cancelled():
        # A schema whose answer cannot be short (a json_object may be "{}"
        # and end before the fifth chunk): the cancel always lands mid-answer.
        long_text = {"type": "json_schema", "json_schema": {"name": "Long", "strict": True, "schema": {
            "type": "object", "properties": {"text": {"type": "string", "minLength": 200}},
            "required": ["text"], "additionalProperties": False}}}
        s = client.chat.completions.create(model="default", messages=ASK, max_tokens=200, stream=True,
                                           response_format=long_text)
        n = 0
        for _ in s:
            n += 1
            if n == 5:
                s.close()  # the client goes away: the server cancels it
                break
        results["cancelled"] = n

    def parsed(key, seed):
        r = client.chat.completions.parse(model="default", messages=ASK, response_format=Person,
                                          temperature=1.0, seed=seed, max_tokens=400)
        results[key] = r.choices[0].message.parsed

    threads = [threading.Thread(target=free_stream), threading.Thread(target=cancelled),
               threading.Thread(target=parsed, args=("p1", 11))]
    for t in threads:
        t.start()
    assert first_chunk.wait(120)
    late = threading.Thread(target=parsed, args=("late", 12))  # joins mid-decode
    late.start()
    for t in threads + [late]:
        t.join(300)
    assert isinstance(results["p1"], Person) and isinstance(results["late"], Person)
    assert results["cancelled"] == 5
    assert len(results["free"]) > 20
    # The free request, greedy, matches the same request alone (no grammar leaked into it).
    alone = client.chat.completions.create(model="default", messages=ASK, max_tokens=120, temperature=0)
    assert alone.choices[0].message.content.split()[:8] == results["free"].split()[:8]


# Last in the module: it kills the shared server's worker.
def test_constrained_streams_survive_worker_kill(client, server):
    """A constrained stream resumes on the restarted worker, which replays the
    delivered tokens into a fresh matcher (and call parser): the output is the
    crash-free one and stays valid."""
    import os
    import signal

    def running_worker():
        _, st = server.get("/stats")
        return next((w["pid"] for w in st["workers"] if w["requests_in_flight"] > 0), None)

    ref = client.chat.completions.parse(model="default", messages=ASK, max_tokens=400, temperature=0,
                                        response_format=Person)
    want = ref.choices[0].message.content
    with client.chat.completions.stream(model="default", messages=ASK, max_tokens=400, temperature=0,
                                        response_format=Person) as s:
        killed = None
        for ev in s:
            if ev.type == "content.delta" and killed is None and len(ev.snapshot) > 10:
                killed = running_worker()
                assert killed
                os.kill(killed, signal.SIGKILL)
        final = s.get_final_completion()
    assert killed
    c = final.choices[0]
    assert c.message.content == want and isinstance(c.message.parsed, Person)

    # A named tool call: the kill lands while the call's text is held back.
    tool_ref = client.chat.completions.create(model="default", messages=WEATHER_ASK, max_tokens=100, temperature=0,
                                              tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    stream = client.chat.completions.create(model="default", messages=WEATHER_ASK, max_tokens=100, temperature=0,
                                            tools=[WEATHER_TOOL], stream=True,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    args, names, killed, finish = "", [], None, None
    for ch in stream:
        if killed is None:
            killed = running_worker()
            assert killed
            os.kill(killed, signal.SIGKILL)
        for c in ch.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                if tc.function.name:
                    names.append(tc.function.name)
                args += tc.function.arguments or ""
    assert killed and finish == "tool_calls" and names == ["get_weather"]
    assert args == tool_ref.choices[0].message.tool_calls[0].function.arguments
    server.wait_ready(120)
