"""Tool calls split out of the output (krserve_worker.tools.CallStream).

Streamed calls (stream=True): the texts are what the calls' grammar writes for
``tool_choice`` ``required`` or a named function (json_tools layout, no
flexible whitespace): however the text is cut into deltas, the entries
assemble to the calls the whole-call path gives, arguments byte for byte;
fragments never carry the closing markup; a resume at any point delivers
exactly the rest.

Whole calls (``tool_choice`` ``auto``): an end marker inside a JSON string
does not end the call, however the text is cut and resumed; in a format that
is not JSON the first marker does. ``cut``: the output ended inside a call
that is not whole (the front door then keeps ``stop``/``length`` rather than
``tool_calls``).
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest

from krserve_worker import grammar, tools

MODEL = Path(os.path.expanduser("~/.cache/krserve/models/SmolLM2-135M-Instruct-Q4_1"))

WEATHER = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>'
# Braces, markers and escapes inside strings, nesting, numbers, non-ASCII.
EVENT = ('<tool_call>\n{"name":"create_event","arguments":{"title":"Lunch } at <tool_call> \\"Chez Zoé\\" 🙂",'
         '"when":{"day":"2025-01-02","hours":[12,13.5,-1e3]},"notes":"a\\nb }\\n</tool_call> }}","ok":true}}\n'
         '</tool_call>')
# parallel calls (required): one after another, the second without arguments.
TWO = WEATHER + '\n<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>'
# A native json_tools model's own spacing (the parsers accept it too).
SPACED = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]} }\n</tool_call>'
TEXTS = [WEATHER, EVENT, TWO, SPACED]
IDS = ["weather", "event", "two", "spaced"]
# What each text calls: name and arguments, as the model wrote them.
CALLS = {
    WEATHER: [("get_weather", '{"city":"Paris"}')],
    EVENT: [("create_event", EVENT[EVENT.index('{"title"'):EVENT.rindex("}}") + 1])],
    TWO: [("get_weather", '{"city":"Paris"}'), ("get_time", "{}")],
    SPACED: [("get_weather", '{"city": "Paris", "days": [1, 2]}')],
}


def feed(cs, pieces, final=True):
    content, entries = "", []
    for p in pieces:
        c, e = cs.feed(p)
        content += c
        entries += e
    if final:
        c, e = cs.feed("", final=True)
        content += c
        entries += e
    return content, entries


def check_order(entries, begun=0):
    """The scheduler's rule (scheduler.checkCalls): a named entry begins the
    next call, an unnamed one continues the last call begun."""
    for e in entries:
        if e.get("name"):
            assert e["index"] == begun, entries
            begun += 1
        else:
            assert begun > 0 and e["index"] == begun - 1, entries
    return begun


def assemble(entries):
    check_order(entries)
    calls = []
    for e in entries:
        if e.get("name"):
            calls.append({"name": e["name"], "arguments": ""})
        calls[e["index"]]["arguments"] += e["arguments"]
    return calls


def whole(text):
    """The whole-call path (tool_choice auto) on the same text, in one delta."""
    content, entries = feed(tools.CallStream(tools.FALLBACK, []), [text])
    assert all("name" in e for e in entries)
    return content, [{"name": e["name"], "arguments": e["arguments"]} for e in entries]


def cuts(text, rng):
    """Ways to cut text into deltas: single characters, fixed sizes, every
    split in two, random partitions."""
    yield list(text)
    for size in (2, 3, 5, 8, 13, len(text)):
        yield [text[i:i + size] for i in range(0, len(text), size)]
    for k in range(1, len(text)):
        yield [text[:k], text[k:]]
    for _ in range(200):
        points = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(20, len(text) - 1))))
        yield [text[a:b] for a, b in zip([0] + points, points + [len(text)])]


def expected(text):
    want = [{"name": n, "arguments": a} for n, a in CALLS[text]]
    assert whole(text) == ("", want)
    return want


def resumed(text, k, fmt=tools.FALLBACK, stream=True, end=None):
    """A worker dies after ``text[:k]`` of the output ``text[:end]``: the
    first worker's content and entries, then the next worker's, which replays
    ``text[:k]`` with the scheduler's counts; and the next worker's CallStream."""
    end = len(text) if end is None else end
    first = tools.CallStream(fmt, [], stream=stream)
    c1, e1 = feed(first, [text[i:min(i + 3, k)] for i in range(0, k, 3)], final=False)
    begun = check_order(e1)
    sent_args = 0
    for e in e1:
        sent_args = (0 if e.get("name") else sent_args) + len(e["arguments"].encode())
    again = tools.CallStream(fmt, [], skip_bytes=len(c1.encode()), skip_calls=begun,
                             skip_args=sent_args, stream=stream)
    c2a, e2a = feed(again, [text[:k]], final=False)  # the replay
    c2b, e2b = feed(again, [text[i:min(i + 4, end)] for i in range(k, end, 4)])
    check_order(e2a + e2b, begun)
    return c1 + c2a + c2b, e1 + e2a + e2b, again


@pytest.mark.parametrize("text", TEXTS, ids=IDS)
def test_every_cut_assembles_the_whole_calls(text):
    want = expected(text)
    rng = random.Random(16)
    for pieces in cuts(text, rng):
        content, entries = feed(tools.CallStream(tools.FALLBACK, [], stream=True), pieces)
        assert content == ""
        assert assemble(entries) == want, pieces
        for e in entries:
            if e.get("name"):
                assert e["arguments"] == ""  # the header: name, then arguments ""


@pytest.mark.parametrize("text", TEXTS, ids=IDS)
def test_fragments_never_carry_the_closing(text):
    """Fed one character at a time, each call's fragments are its arguments
    and nothing else (the call's "}" and the end marker are never sent), and
    they arrive as the model writes them."""
    want = expected(text)
    cs = tools.CallStream(tools.FALLBACK, [], stream=True)
    got: dict[int, str] = {}
    fragments = 0
    for ch in text:
        _, entries = cs.feed(ch)
        for e in entries:
            got[e["index"]] = got.get(e["index"], "") + e["arguments"]
            fragments += not e.get("name")
            for i, s in got.items():
                assert want[i]["arguments"].startswith(s)  # never more than the arguments
    _, entries = cs.feed("", final=True)
    assert entries == []  # nothing was left to flush: all went out before the end
    assert [got[i] for i in sorted(got)] == [c["arguments"] for c in want]
    assert fragments >= sum(len(c["arguments"]) > 1 for c in want) * 2


def test_header_as_soon_as_the_name_is_complete():
    cs = tools.CallStream(tools.FALLBACK, [], stream=True)
    name_end = WEATHER.index('"get_weather"') + len('"get_weather"')
    _, entries = cs.feed(WEATHER[:name_end - 1])
    assert entries == []
    _, entries = cs.feed(WEATHER[name_end - 1])
    assert entries == [{"index": 0, "name": "get_weather", "arguments": ""}]
    # Each character of the arguments goes out with the next one (the last
    # "}" of the arguments may be the call's).
    args_at = WEATHER.index('"arguments":') + len('"arguments":')
    _, entries = cs.feed(WEATHER[name_end:args_at + 3])
    assert entries == [{"index": 0, "arguments": '{"c'}]


@pytest.mark.parametrize("text", TEXTS, ids=IDS)
def test_resume_at_every_point_delivers_exactly_the_rest(text):
    """A worker dies after any character: the scheduler counts the calls
    begun and the bytes of the last one's arguments delivered; the next
    worker replays the text and sends exactly the rest."""
    want = expected(text)
    for k in range(len(text) + 1):
        content, entries, cs = resumed(text, k)
        assert content == "" and not cs.cut
        assert assemble(entries) == want, k


def test_cut_short_ends_the_call_with_what_was_generated():
    """max_tokens or a stop string ends the output inside a call: a call whose
    header went out ends with its arguments as far as they were generated;
    one cut before its name is complete (inside its start marker too) is
    dropped, never content: the grammar writes nothing but calls. After a
    whole call, a second one cut that early leaves the first as it was."""
    args = '{"city":"Paris"}'
    name_end = WEATHER.index('"get_weather"') + len('"get_weather"')
    args_at = WEATHER.index(args)
    for k in range(len(WEATHER)):
        cs = tools.CallStream(tools.FALLBACK, [], stream=True)
        content, entries = feed(cs, list(WEATHER[:k]))
        assert content == ""
        assert cs.cut == (0 < k < WEATHER.index("\n" + tools.END))  # (then whole, its end marker cut)
        if k < name_end:
            assert entries == []
            continue
        calls = assemble(entries)
        assert [c["name"] for c in calls] == ["get_weather"]
        assert calls[0]["arguments"] == args[:max(0, k - args_at)]


def test_a_second_call_cut_in_its_start_marker_is_not_content():
    """What `make up` showed: parallel calls cut by max_tokens in the next
    call's start marker gave content "\n<tool"."""
    second = TWO.index("\n<tool_call>", 1)
    for k in range(second + 2, second + 1 + len(tools.START) + 12):  # from its "<"
        cs = tools.CallStream(tools.FALLBACK, [], stream=True)
        content, entries = feed(cs, list(TWO[:k]))
        assert content == "" and cs.cut, k
        assert [c["name"] for c in assemble(entries)] == ["get_weather"]


def test_an_end_marker_inside_a_string_does_not_end_the_call():
    _, calls = whole(EVENT)
    _, entries = feed(tools.CallStream(tools.FALLBACK, [], stream=True), [EVENT])
    assert assemble(entries) == calls
    args = json.loads(calls[0]["arguments"])
    assert args["notes"] == "a\nb }\n</tool_call> }}" and args["when"]["hours"] == [12, 13.5, -1000.0]


# tool_choice auto: a model's own calls (json.dumps spacing), with end markers
# inside strings, an escaped quote and an escaped backslash before a marker,
# text around them.
NOTE = '<tool_call>\n{"name": "note", "arguments": {"text": "write </tool_call> here"}}\n</tool_call>'
QUOTES = ('<tool_call>\n{"name": "note", "arguments": {"text": "q\\" </tool_call> \\\\", '
          '"more": ["</tool_call>", {"x": "}</tool_call>"}]}}\n</tool_call>')
AUTO = "Let me note it.\n" + NOTE + "\n" + QUOTES + "\nDone </tool_call> then."
AUTO_CALLS = [{"name": "note", "arguments": '{"text": "write </tool_call> here"}'},
              {"name": "note", "arguments": '{"text": "q\\" </tool_call> \\\\", "more": ["</tool_call>", {"x": "}</tool_call>"}]}'}]
AUTO_CONTENT = "Let me note it.\nDone </tool_call> then."


def test_auto_mode_marker_inside_a_string_every_cut():
    """The whole-call path reads past an end marker inside a JSON string,
    however the text is cut into deltas; a marker outside a call is content."""
    assert json.loads(AUTO_CALLS[1]["arguments"])["text"] == 'q" </tool_call> \\'
    rng = random.Random(17)
    for pieces in cuts(AUTO, rng):
        cs = tools.CallStream(tools.FALLBACK, [])
        content, entries = feed(cs, pieces)
        assert content == AUTO_CONTENT, pieces
        assert [{"name": e["name"], "arguments": e["arguments"]} for e in entries] == AUTO_CALLS, pieces
        assert [e["index"] for e in entries] == [0, 1] and not cs.cut


def test_auto_mode_resume_at_every_point():
    for k in range(len(AUTO) + 1):
        content, entries, cs = resumed(AUTO, k, stream=False)
        assert content == AUTO_CONTENT and assemble(entries) == AUTO_CALLS and not cs.cut, k


def test_auto_mode_text_that_is_not_json_ends_at_the_first_marker():
    """A JSON-shaped call whose "string" holds a raw newline (JSON escapes
    them) was not JSON: the first marker ended it, it does not parse and is
    content, and the text after it goes out before the output ends."""
    text = ('<tool_call>\n{"name": "note", "arguments": {"text": "oops </tool_call>\n'
            'The model went on talking here, at some length.')
    head = text.index("</tool_call>") + len("</tool_call>")
    for pieces in cuts(text, random.Random(18)):
        cs = tools.CallStream(tools.FALLBACK, [])
        content, entries = feed(cs, pieces, final=False)
        assert entries == [] and content.startswith(text[:head]) and len(content) > head + 20, pieces
        rest, entries = cs.feed("", final=True)
        assert content + rest == text and entries == [] and not cs.cut


def _xml_parse(text, tools_=None):
    """A call format that is not JSON (qwen3_coder's layout)."""
    m = re.fullmatch(r"\s*<function=(\w+)>\s*<parameter=(\w+)>\n(.*?)\n</parameter>\s*</function>\s*", text, re.S)
    if m is None:
        raise ValueError("not a call")
    return {"name": m.group(1), "arguments": {m.group(2): m.group(3)}}


def test_a_format_that_is_not_json_ends_at_the_first_marker():
    xml = tools.CallFormat(tools.START, tools.END, _xml_parse, native=True)
    ok = "<tool_call>\n<function=note>\n<parameter=text>\nhi\n</parameter>\n</function>\n</tool_call>"
    content, entries = feed(tools.CallStream(xml, []), list(ok))
    assert content == "" and entries == [{"index": 0, "name": "note", "arguments": '{"text": "hi"}'}]
    marker = ok.replace("hi", "write </tool_call> here")  # the first marker ends it: no call
    for pieces in cuts(marker, random.Random(19)):
        content, entries = feed(tools.CallStream(xml, []), pieces)
        assert entries == [] and content == marker, pieces


# The output ends inside a call (a stop string, max_tokens): ``cut`` says
# whether that call is not whole.
@pytest.mark.parametrize("text,stream", [(WEATHER, True), (TWO, True), (WEATHER, False), (TWO, False), (NOTE, False)],
                         ids=["streamed-weather", "streamed-two", "whole-weather", "whole-two", "whole-note"])
def test_cut_says_whether_the_output_ended_inside_a_call(text, stream):
    """At every place the output may end: ``cut`` while a call is open and
    its JSON is not complete (a streamed call ends with its arguments as far
    as they went; a whole one is content), not between calls nor once a
    call's JSON is complete (its end marker cut off). (NOTE is a model's own
    spacing, not what the grammar writes: whole calls only.)"""
    opened = []  # (where a call's JSON starts, where it is complete)
    at = text.find(tools.START)
    while at >= 0:
        body = at + len(tools.START)
        close = text.index("\n" + tools.END, body)
        opened.append((body, close))
        at = text.find(tools.START, close)
    for k in range(len(text) + 1):
        cs = tools.CallStream(tools.FALLBACK, [], stream=stream)
        content, entries = feed(cs, list(text[:k]))
        # Streamed calls: inside a start marker is a call cut too.
        want = any((b - len(tools.START) < k if stream else b <= k) and k < c for b, c in opened)
        assert cs.cut == want, (k, text[:k])
        if not stream:
            continue
        calls = assemble(entries)
        full = CALLS[text]
        for i, c in enumerate(calls):  # arguments as far as they were generated
            assert full[i][1].startswith(c["arguments"]) and c["name"] == full[i][0], (k, calls)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_cut_survives_a_resume(stream):
    """A worker dies anywhere before a stop string cuts the call: the next
    worker, replaying the text, reports the same cut and the same calls as a
    run without a crash."""
    text = TWO
    end = text.rindex('{}')  # the second call stops inside its JSON
    ref = tools.CallStream(tools.FALLBACK, [], stream=stream)
    ref_content, ref_entries = feed(ref, [text[:end]])
    assert ref.cut
    for k in range(end + 1):
        content, entries, cs = resumed(text, k, stream=stream, end=end)
        assert cs.cut and content == ref_content and assemble(entries) == assemble(ref_entries), k


def test_auto_mode_keeps_whole_calls():
    """tool_choice auto: one entry per call, once it is complete and parses;
    text that looks like a call but does not parse stays content."""
    text = "Sure.\n" + TWO + "\n<tool_call>\n{not json}\n</tool_call>"
    cs = tools.CallStream(tools.FALLBACK, [])
    content, entries = feed(cs, list(text))
    assert entries == [{"index": 0, "name": "get_weather", "arguments": '{"city":"Paris"}'},
                       {"index": 1, "name": "get_time", "arguments": "{}"}]
    assert content == "Sure.\n<tool_call>\n{not json}\n</tool_call>"


def test_arguments_are_the_models_text():
    """A json_tools call's arguments are kept as written (OpenAI's are the
    model's text too); another layout is parsed and re-serialized."""
    assert tools.raw_call('{"name":"f","arguments":{"a":1.50,"b":"\\u00e9"}}') == ("f", '{"a":1.50,"b":"\\u00e9"}')
    assert tools.raw_call('\n{"name": "f", "arguments": {"a": 1} }\n') == ("f", '{"a": 1}')
    for not_raw in ['{"arguments":{"a":1},"name":"f"}', '{"name":"f","arguments":"{}"}',
                    '{"name":"f","arguments":{"a":1},"x":2}', '{"name":"f","arguments":{"a":1}']:
        assert tools.raw_call(not_raw) is None, not_raw
    _, calls = whole('<tool_call>\n{"arguments": {"a":1}, "name": "f"}\n</tool_call>')
    assert calls == [{"name": "f", "arguments": '{"a": 1}'}]


def _tool(name, props, required):
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": props, "required": required, "additionalProperties": False}}}


WEATHER_TOOL = _tool("get_weather", {"city": {"type": "string"}}, ["city"])
TIME_TOOL = _tool("get_time", {}, [])
EVENT_TOOL = _tool("create_event", {
    "title": {"type": "string"},
    "when": {"type": "object", "properties": {"day": {"type": "string"}, "hours": {"type": "array", "items": {"type": "number"}}},
             "required": ["day", "hours"], "additionalProperties": False},
    "notes": {"type": "string"}, "ok": {"type": "boolean"}}, ["title", "when", "notes", "ok"])


@pytest.mark.model
@pytest.mark.parametrize("text,treq", [
    (WEATHER, tools.ToolRequest([WEATHER_TOOL, TIME_TOOL], "function", "get_weather", True)),
    (EVENT, tools.ToolRequest([WEATHER_TOOL, EVENT_TOOL], "function", "create_event", True)),
    (TWO, tools.ToolRequest([WEATHER_TOOL, TIME_TOOL], "required", "", False)),
], ids=["weather", "event", "two"])
def test_texts_are_what_the_grammar_writes(text, treq):
    """The texts above are outputs of the calls' grammar (so the layout the
    splitter relies on is the grammar's), and the spaced one is not."""
    if not MODEL.exists():
        pytest.skip("default model not fetched")
    from mlx_lm.tokenizer_utils import load

    tok = load(MODEL)
    grammars = grammar.Grammars(tok._tokenizer, 49152, [2])
    ids = tok.encode(text, add_special_tokens=False)
    m = tools.call_matcher(grammars, treq)
    assert m.try_consume_tokens(ids) == len(ids) and m.is_accepting()
    ids = tok.encode(SPACED, add_special_tokens=False)
    m = tools.call_matcher(grammars, treq)
    assert m.try_consume_tokens(ids) < len(ids)


def test_gen_resume_counts_are_checked():
    from krserve_worker.params import InvalidRequest, parse_gen

    gen = {"t": "gen", "id": 1, "prompt": [1, 2], "max_tokens": 4}
    p = parse_gen(dict(gen, resume=[3], sent_calls=2, sent_args=7), 100)
    assert (p.sent_calls, p.sent_args) == (2, 7)
    with pytest.raises(InvalidRequest, match="sent_args without sent_calls"):
        parse_gen(dict(gen, resume=[3], sent_args=7), 100)
    with pytest.raises(InvalidRequest, match="sent_args must be >= 0"):
        parse_gen(dict(gen, resume=[3], sent_calls=1, sent_args=-1), 100)
