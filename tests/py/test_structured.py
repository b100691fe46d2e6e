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


class Note(BaseModel):
    """Save a note"""
    title: str = Field(max_length=30)
    body: str = Field(min_length=40, max_length=80)


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
# A call with arguments of many tokens (the body has at least 40 characters).
NOTE_TOOL = {"type": "function", "function": {
    "name": "create_note", "description": "Save a note",
    "parameters": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 30},
                                                   "body": {"type": "string", "minLength": 40, "maxLength": 80}},
                   "required": ["title", "body"], "additionalProperties": False}}}
NOTE_ASK = [{"role": "user", "content": "Save a note about the sea."}]
NAMED_NOTE = {"type": "function", "function": {"name": "create_note"}}


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
    assert events.count("tool_calls.function.arguments.delta") > 1, events  # in fragments
    assert len(c.message.tool_calls) == 1
    tc = c.message.tool_calls[0]
    assert tc.id.startswith("call_") and tc.function.name == "get_weather"
    assert isinstance(tc.function.parsed_arguments, Weather)
    assert "tool_calls.function.arguments.done" in events
    # Not streamed, the same greedy call.
    r = client.chat.completions.create(model="default", messages=WEATHER_ASK, max_tokens=100, temperature=0,
                                       tools=[tool], tool_choice="required", parallel_tool_calls=False)
    assert r.choices[0].message.tool_calls[0].function.arguments == tc.function.arguments


def tool_deltas(chunks):
    """A raw stream's tool call deltas, per index: how often id, type and
    name came, the arguments fragments; and the finish reason."""
    calls, finish = {}, None
    for ch in chunks:
        for c in ch.choices:
            finish = c.finish_reason or finish
            assert c.delta.role in (None, "assistant")
            for tc in c.delta.tool_calls or []:
                d = calls.setdefault(tc.index, {"ids": [], "types": [], "names": [], "frags": []})
                for key, v in (("ids", tc.id), ("types", tc.type), ("names", tc.function and tc.function.name)):
                    if v:
                        d[key].append(v)
                if tc.function and tc.function.arguments:
                    d["frags"].append(tc.function.arguments)
    return calls, finish


def test_named_call_streams_arguments_in_fragments(client):
    """The call's id, type and name come once, then its arguments in
    fragments as they are generated; concatenated they are exactly the
    arguments the same greedy call has unstreamed."""
    kw = dict(model="default", messages=NOTE_ASK, max_tokens=200, temperature=0, tools=[NOTE_TOOL],
              tool_choice=NAMED_NOTE)
    ref = client.chat.completions.create(**kw).choices[0]
    assert ref.finish_reason == "tool_calls" and len(ref.message.tool_calls) == 1
    want = ref.message.tool_calls[0].function.arguments
    calls, finish = tool_deltas(client.chat.completions.create(stream=True, **kw))
    assert finish == "tool_calls" and list(calls) == [0]
    d = calls[0]
    assert d["names"] == ["create_note"] and d["types"] == ["function"] and len(d["ids"]) == 1
    assert d["ids"][0].startswith("call_")
    assert len(d["frags"]) > 5, d["frags"]  # a 40-character body is many tokens
    args = "".join(d["frags"])
    assert args == want
    parsed = json.loads(args)
    assert parsed == json.loads(want) and set(parsed) == {"title", "body"} and len(parsed["body"]) >= 40

    # .stream() assembles the same fragments and parses them (a strict pydantic tool).
    tool = openai.pydantic_function_tool(Note, name="create_note")
    kw = dict(model="default", messages=NOTE_ASK, max_tokens=200, temperature=0, tools=[tool],
              tool_choice=NAMED_NOTE)
    with client.chat.completions.stream(**kw) as s:
        deltas = [e.arguments_delta for e in s if e.type == "tool_calls.function.arguments.delta"]
        final = s.get_final_completion()
    tc = final.choices[0].message.tool_calls[0]
    assert len(deltas) > 5 and "".join(deltas) == tc.function.arguments
    assert isinstance(tc.function.parsed_arguments, Note)
    assert tc.function.arguments == client.chat.completions.create(**kw).choices[0].message.tool_calls[0].function.arguments


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


def test_streamed_call_resumes_mid_arguments():
    """A worker dies after it streamed part of a call's arguments
    (KRSERVE_WORKER_FAULT segv-after-tokens): the scheduler tells the next
    worker how many bytes of them went out, and the client assembles exactly
    the crash-free call, its id and name once."""
    import re
    import urllib.request

    from conftest import WorkerProc
    from krserve_worker import prepare

    marker = "(note 16)"
    ask = [{"role": "user", "content": NOTE_ASK[0]["content"] + " " + marker}]
    # The crash-free run, at the protocol level: which token's frame begins the
    # arguments, which ends the call. (The tools as the front door sends them.)
    probe = WorkerProc(str(prepare.model_dir()))
    try:
        probe.hello()
        probe.send({"t": "gen", "id": 1, "max_tokens": 200, "messages": ask, "tool_choice": "function",
                    "tool_name": "create_note", "tools": json.dumps([NOTE_TOOL], separators=(",", ":"))})
        frames = probe.collect(1, timeout=300)
    finally:
        probe.stop()
    done = frames[-1]
    assert done["t"] == "done" and done["reason"] == "stop", done
    entries = [(n, e) for n, f in enumerate(frames, 1) for e in f.get("calls", [])]
    assert [e["name"] for _, e in entries if e.get("name")] == ["create_note"]
    want = "".join(e["arguments"] for _, e in entries)
    first_frag = next(n for n, e in entries if not e.get("name") and e["arguments"])
    last = entries[-1][0]
    # Crash after the N-th token: mid-arguments, and late enough that the next
    # worker finishes before its own N-th token.
    n = max(first_frag, done["ctoks"] // 2 + 1)
    before = "".join(e["arguments"] for k, e in entries if k <= n)
    assert n < last and 0 < len(before) < len(want), (n, first_frag, last, done["ctoks"])

    server = Server(None, "--workers", "1", env={"KRSERVE_WORKER_FAULT": f"segv-after-tokens:{n}:{marker}"})
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        chunks = list(c.chat.completions.create(
            model="default", messages=ask, max_tokens=200, temperature=0, tools=[NOTE_TOOL],
            tool_choice=NAMED_NOTE, stream=True, stream_options={"include_usage": True}))
        calls, finish = tool_deltas(chunks)
        assert finish == "tool_calls" and list(calls) == [0]
        d = calls[0]
        assert d["names"] == ["create_note"] and d["types"] == ["function"] and len(d["ids"]) == 1
        assert "".join(d["frags"]) == want
        assert chunks[-1].usage.prompt_tokens == done["ptoks"]  # the probe's prompt was the same
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
            resumed = re.search(r"^krserve_requests_resumed_total(?:\{[^}]*\})? (\S+)$", r.read().decode(), re.M)
        assert resumed and float(resumed.group(1)) == 1, "the worker did not die mid-call"
        assert "segv-after-tokens: request" in server.log()
    finally:
        assert server.stop() == 0, server.log()


# A tool whose one argument is forced to one value: with tool_choice required
# and one call, the grammar writes exactly
#   <tool_call>\n{"name":"set_unit","arguments":{"unit":"celsius"}}\n</tool_call>
# so a stop string "celsius" always cuts the call inside its arguments.
UNIT_TOOL = {"type": "function", "function": {
    "name": "set_unit", "description": "Set the temperature unit",
    "parameters": {"type": "object", "properties": {"unit": {"type": "string", "enum": ["celsius"]}},
                   "required": ["unit"], "additionalProperties": False}}}
UNIT_ASK = [{"role": "user", "content": "Show temperatures in degrees Celsius."}]
UNIT_KW = dict(model="default", max_tokens=60, temperature=0, tools=[UNIT_TOOL], tool_choice="required",
               parallel_tool_calls=False)


def test_call_cut_by_a_stop_string_is_not_tool_calls(client):
    """A stop string inside a call's arguments ends the answer with finish_reason
    stop (not tool_calls) and the arguments as far as they were generated,
    streamed and not; without it the same call is whole and tool_calls;
    max_tokens inside it gives length."""
    r = client.chat.completions.create(messages=UNIT_ASK, **UNIT_KW).choices[0]
    assert r.finish_reason == "tool_calls", r
    assert [(tc.function.name, tc.function.arguments) for tc in r.message.tool_calls] == \
        [("set_unit", '{"unit":"celsius"}')]
    calls, finish = tool_deltas(client.chat.completions.create(messages=UNIT_ASK, stream=True, **UNIT_KW))
    assert finish == "tool_calls" and "".join(calls[0]["frags"]) == '{"unit":"celsius"}'

    stopped = client.chat.completions.create(messages=UNIT_ASK, stop=["celsius"], **UNIT_KW)
    r = stopped.choices[0]
    assert r.finish_reason == "stop", r
    assert [(tc.function.name, tc.function.arguments) for tc in r.message.tool_calls] == [("set_unit", '{"unit":"')]
    assert r.message.tool_calls[0].id.startswith("call_")
    calls, finish = tool_deltas(client.chat.completions.create(messages=UNIT_ASK, stop=["celsius"], stream=True,
                                                                **UNIT_KW))
    assert finish == "stop" and list(calls) == [0], (calls, finish)
    assert calls[0]["names"] == ["set_unit"] and len(calls[0]["ids"]) == 1
    assert "".join(calls[0]["frags"]) == '{"unit":"'

    # max_tokens ends it before "celsius" is complete: length, as before.
    short = dict(UNIT_KW, max_tokens=stopped.usage.completion_tokens - 1)
    r = client.chat.completions.create(messages=UNIT_ASK, **short).choices[0]
    assert r.finish_reason == "length" and r.message.tool_calls[0].function.name == "set_unit", r
    args = r.message.tool_calls[0].function.arguments
    assert '{"unit":"celsius"}'.startswith(args) and len(args) < len('{"unit":"celsius"}'), args


def test_cut_call_in_done_frames():
    """At the protocol level: the done of a call cut by a stop string says
    cut_call, a whole call's does not; and a worker that resumes after the
    stop string was complete (its done was lost) finds it in the replay,
    sends the rest of the arguments and says cut_call too."""
    from conftest import WorkerProc
    from krserve_worker import prepare

    gen = {"t": "gen", "max_tokens": 60, "messages": UNIT_ASK, "tool_choice": "required", "one_call": True,
           "tools": json.dumps([UNIT_TOOL], separators=(",", ":"))}
    w = WorkerProc(str(prepare.model_dir()))
    try:
        w.hello()
        w.send(dict(gen, id=1), dict(gen, id=2, stop=["celsius"]))
        whole, cut = w.collect(1, timeout=300), w.collect(2, timeout=300)
        assert whole[-1]["t"] == "done" and whole[-1]["reason"] == "stop" and "cut_call" not in whole[-1], whole[-1]
        assert cut[-1]["t"] == "done" and cut[-1]["reason"] == "stop" and cut[-1].get("cut_call") is True, cut[-1]
        entries = [e for f in cut for e in f.get("calls", [])]
        assert "".join(e["arguments"] for e in entries) == '{"unit":"'
        # The done was lost: every token delivered, the done's entries not.
        toks = [f for f in cut if f["t"] == "tok"]
        delivered = [e for f in toks for e in f.get("calls", [])]
        sent_args = sum(len(e["arguments"].encode()) for e in delivered)
        w.send(dict(gen, id=3, stop=["celsius"], resume=[i for f in toks for i in f["ids"]], max_tokens=0,
                    sent_calls=1, sent_args=sent_args))
        again = w.collect(3, timeout=300)
        assert [f["t"] for f in again] == ["done"] and again[0]["reason"] == "stop", again
        assert again[0].get("cut_call") is True
        rest = "".join(e["arguments"] for e in again[0].get("calls", []))
        assert all(not e.get("name") for e in again[0].get("calls", []))
        assert "".join(e["arguments"] for e in delivered) + rest == '{"unit":"'
    finally:
        w.stop()


def test_call_cut_by_a_stop_string_after_a_resume(client):
    """The worker dies just before the stop string cuts the call: the next
    worker replays the call's text and still reports it cut (finish_reason
    stop), and the client gets the arguments once, as far as they went."""
    import re
    import urllib.request

    marker = "(cut 16)"
    ask = [{"role": "user", "content": UNIT_ASK[0]["content"] + " " + marker}]
    ref = client.chat.completions.create(messages=ask, stop=["celsius"], **UNIT_KW)
    assert ref.choices[0].finish_reason == "stop"
    n = ref.usage.completion_tokens - 2  # the crash lands inside the call's arguments
    server = Server(None, "--workers", "1", env={"KRSERVE_WORKER_FAULT": f"segv-after-tokens:{n}:{marker}"})
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        calls, finish = tool_deltas(c.chat.completions.create(messages=ask, stop=["celsius"], stream=True, **UNIT_KW))
        assert finish == "stop" and list(calls) == [0], (calls, finish)
        assert calls[0]["names"] == ["set_unit"] and len(calls[0]["ids"]) == 1
        assert "".join(calls[0]["frags"]) == '{"unit":"'
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
            resumed = re.search(r"^krserve_requests_resumed_total(?:\{[^}]*\})? (\S+)$", r.read().decode(), re.M)
        assert resumed and float(resumed.group(1)) == 1, "the worker did not die mid-call"
    finally:
        assert server.stop() == 0, server.log()


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
