"""Tool calls: rendering tools into the prompt, constraining and parsing calls.

A gen with ``tools`` (the JSON text of the request's OpenAI tools array) and a
``tool_choice``:

- ``none``: the tools are left out of the prompt and nothing is parsed.
- ``auto``: the tools are rendered into the prompt; the output is free, and
  calls in it are parsed out of the text (``CallStream``).
- ``required``: the output is constrained by a grammar to one or more calls
  (exactly one with ``one_call``) to the given tools, each with arguments
  matching the tool's parameter schema, then EOS.
- ``function`` (with ``tool_name``): constrained to one call of that function.

Call formats. A model whose tokenizer mlx-lm gives a tool parser
(``has_tool_calling``, ``tool_call_start``/``tool_call_end``,
``mlx_lm.tool_parsers``) renders tools through its chat template
(``apply_chat_template(tools=...)``) and its calls are parsed with its parser
in ``auto`` mode. The grammar of ``required``/``function`` writes the
``json_tools`` format (Hermes, Qwen 2.5/3)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

which is that family's native format; for a model of another family (and a
model without a parser) the same format is krserve's documented fallback,
parsed with ``json_tools``'s parser. A model without a parser whose chat
template ignores ``tools`` gets the tools and this format described in a
system message (``FALLBACK_PROMPT``), and earlier calls in the history are
written into the assistant message's content in the same format.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .params import InvalidRequest

START, END = "<tool_call>", "</tool_call>"

FALLBACK_PROMPT = (
    "You can call the following tools (functions). Each is described by a JSON "
    "object with its name, description and the JSON Schema of its parameters:\n"
    "{tools}\n"
    "To call a tool, answer with exactly\n"
    "<tool_call>\n"
    '{{"name": "<function name>", "arguments": <arguments as a JSON object>}}\n'
    "</tool_call>\n"
    "one block per call, and nothing else."
)


def _parse_json_call(text: str, tools=None):
    return json.loads(text.strip())


@dataclass(frozen=True)
class CallFormat:
    start: str
    end: str
    parse: object  # (text, tools) -> dict or list of dicts with name, arguments
    native: bool  # the model's own parser


FALLBACK = CallFormat(START, END, _parse_json_call, native=False)


def model_format(tokenizer) -> CallFormat | None:
    """The model's native call format, or None when mlx-lm has no parser for it."""
    if not getattr(tokenizer, "has_tool_calling", False):
        return None
    parse = getattr(tokenizer, "tool_parser", None)
    if parse is None:
        return None
    return CallFormat(tokenizer.tool_call_start, tokenizer.tool_call_end or "", parse, native=True)


def grammar_is_native(fmt: CallFormat | None) -> bool:
    """Whether the constrained format (json_tools) is the model's own."""
    return fmt is not None and fmt.start == START and fmt.end == END


def template_renders_tools(tokenizer) -> bool:
    tpl = getattr(tokenizer, "chat_template", None)
    return isinstance(tpl, str) and "tools" in tpl


@dataclass
class ToolRequest:
    tools: list  # OpenAI tool objects
    choice: str  # auto, none, required, function
    name: str  # with choice == "function"
    one_call: bool

    @property
    def constrained(self) -> bool:
        return self.choice in ("required", "function")


def parse_tool_request(msg) -> ToolRequest | None:
    """The gen's tools and choice, checked; None without tools."""
    text = msg.get("tools", "")
    choice = msg.get("tool_choice", "") or "auto"
    name = msg.get("tool_name", "")
    one_call = bool(msg.get("one_call", False))
    if not text:
        if choice in ("required", "function"):
            raise InvalidRequest(f"tool_choice {choice!r} needs tools")
        return None
    try:
        tools = json.loads(text)
    except ValueError as e:
        raise InvalidRequest(f"tools is not valid JSON: {e}") from None
    if not isinstance(tools, list) or not tools:
        raise InvalidRequest("tools must be a non-empty array")
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequest(f"tools[{i}] must be {{type: function, function: {{name, ...}}}}")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON Schema object")
        names.append(fn["name"])
    if choice not in ("auto", "none", "required", "function"):
        raise InvalidRequest(f"unknown tool_choice {choice!r}")
    if choice == "function" and name not in names:
        raise InvalidRequest(f"tool_choice names function {name!r}, which is not in tools")
    return ToolRequest(tools, choice, name, one_call)


# -- prompt -------------------------------------------------------------------


def _format_call_text(calls) -> str:
    return "\n".join(
        START + "\n" + json.dumps({"name": c["name"], "arguments": _args_obj(c["arguments"])},
                                  ensure_ascii=False) + "\n" + END
        for c in calls)


def _args_obj(arguments: str):
    try:
        return json.loads(arguments) if arguments else {}
    except ValueError:
        return arguments  # as the client sent it


def chat_messages(tokenizer, messages, treq: ToolRequest | None) -> tuple[list, dict]:
    """The chat for ``apply_chat_template`` and its extra keyword arguments,
    from a gen's messages (role, content, tool_calls, tool_call_id)."""
    native = template_renders_tools(tokenizer)
    chat = []
    for m in messages:
        e = {"role": m["role"], "content": m.get("content", "")}
        calls = m.get("tool_calls") or []
        if calls:
            if native:
                e["tool_calls"] = [{"id": c.get("id", ""), "type": "function",
                                    "function": {"name": c["name"],
                                                 "arguments": _args_obj(c["arguments"])}}
                                   for c in calls]
            else:
                e["content"] = (e["content"] + "\n" if e["content"] else "") + _format_call_text(calls)
        if m.get("tool_call_id"):
            e["tool_call_id"] = m["tool_call_id"]
        chat.append(e)
    kwargs = {}
    if treq is not None and treq.choice != "none":
        if native:
            kwargs["tools"] = treq.tools
        else:
            offered = treq.tools
            if treq.choice == "function":
                offered = [t for t in treq.tools if t["function"]["name"] == treq.name]
            desc = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in offered)
            prompt = FALLBACK_PROMPT.format(tools=desc)
            if chat and chat[0]["role"] in ("system", "developer"):
                chat[0] = dict(chat[0], content=chat[0]["content"] + "\n\n" + prompt)
            else:
                chat.insert(0, {"role": "system", "content": prompt})
    return chat, kwargs


# -- grammar ------------------------------------------------------------------


def _rebase_refs(node, base: str):
    """A copy of a schema whose local ``$ref`` pointers ("#...") point under
    ``base`` (the schema moves from the root to ``base``)."""
    if isinstance(node, dict):
        return {k: (base + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#")
                    else _rebase_refs(v, base)) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase_refs(v, base) for v in node]
    return node


def call_grammar(treq: ToolRequest) -> str:
    """The Lark grammar of the calls ``treq`` demands, in the json_tools format.

    Each tool's parameter schema becomes ``$defs/tool<i>`` of one schema whose
    ``$ref`` pointers are rebased there (a pydantic schema's ``#/$defs/X``
    becomes ``#/$defs/tool<i>/$defs/X``)."""
    alts, defs = [], {}
    for i, t in enumerate(treq.tools):
        fn = t["function"]
        if treq.choice == "function" and fn["name"] != treq.name:
            continue
        params = fn.get("parameters") or {"type": "object", "properties": {},
                                          "additionalProperties": False}
        defs[f"tool{i}"] = _rebase_refs(params, f"#/$defs/tool{i}")
        alts.append({"type": "object",
                     "properties": {"name": {"const": fn["name"]},
                                    "arguments": {"$ref": f"#/$defs/tool{i}"}},
                     "required": ["name", "arguments"], "additionalProperties": False})
    body = alts[0] if len(alts) == 1 else {"anyOf": alts}
    body = dict(body, **{"$defs": defs, "x-guidance": {"whitespace_flexible": False}})
    many = not treq.one_call and treq.choice == "required"
    return "\n".join([
        "start: call" + (' ("\\n" call)*' if many else ""),
        f"call: {json.dumps(START + chr(10))} body {json.dumps(chr(10) + END)}",
        "body: %json " + json.dumps(body),
    ])


def call_matcher(grammars, treq: ToolRequest):
    try:
        return grammars.lark_matcher(call_grammar(treq), "tools: cannot build a grammar for "
                                     "the tools' parameter schemas")
    except InvalidRequest:
        raise
    except Exception as e:
        raise InvalidRequest(f"tools: cannot build a grammar: {e}") from None


# -- parsing the output -----------------------------------------------------------

# A json_tools call in the layout the grammar writes: the name first, then the
# arguments (JSON whitespace allowed between the tokens).
_WS = " \t\n\r"
_NAME = re.compile(r'[ \t\n\r]*\{[ \t\n\r]*"name"[ \t\n\r]*:[ \t\n\r]*("(?:[^"\\]|\\.)*")')
_HEAD = re.compile(_NAME.pattern + r'[ \t\n\r]*,[ \t\n\r]*"arguments"[ \t\n\r]*:[ \t\n\r]*(?=[^ \t\n\r])')


def raw_call(body: str) -> tuple[str, str] | None:
    """The name and arguments of a json_tools call written
    ``{"name": N, "arguments": {...}}``, the arguments as the model wrote them;
    None when the body is not in that layout or does not parse.

    krserve never rewrites such a call's arguments (OpenAI's arguments are the
    model's text too): a call streamed in fragments then assembles to exactly
    the arguments of the same call returned whole."""
    m = _HEAD.match(body)
    if m is None:
        return None
    rest = body[m.end():].rstrip(_WS)
    if not rest.endswith("}"):  # the call object's closing brace
        return None
    args = rest[:-1].rstrip(_WS)
    if not args.startswith("{"):
        return None
    try:
        name = json.loads(m.group(1))
        if not isinstance(json.loads(args), dict):
            return None
        json.loads(body)  # and nothing follows the arguments
    except ValueError:
        return None
    return name, args


def _calls_of(parsed) -> list[dict]:
    items = parsed if isinstance(parsed, list) else [parsed]
    out = []
    for c in items:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"]:
            raise ValueError("a tool call needs a name")
        args = c.get("arguments", {})
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        out.append({"name": c["name"], "arguments": args})
    return out


def _closing_at(text: str, start: int, end: str) -> int:
    """Where the tail of ``text[start:]``, a streamed call's arguments so far,
    that may still be the call's closing rather than arguments begins:
    whitespace, ``}`` (the call object's), whitespace and a beginning of the
    end marker. What is held is never more than that, so a fragment is never
    retracted. (Looks at the tail only: each token costs its own length.)"""
    best = len(text)
    for k in range(len(end)):
        if k and not text.endswith(end[:k]):
            continue
        j = len(text) - k
        while j > start and text[j - 1] in _WS:
            j -= 1
        if j > start and text[j - 1] == "}":
            j -= 1
            while j > start and text[j - 1] in _WS:
                j -= 1
        elif k:
            continue
        best = min(best, j)
    return max(best, start)


class _JsonStrings:
    """Where a call's text is inside a JSON string, scanning the text once as
    it grows (each character is looked at once).

    Only a body that is JSON-shaped (its first character after whitespace is
    ``{`` or ``[``) has strings: an end marker inside one of them is part of
    the arguments, not the call's end. Once the top-level value is closed
    (``over``), later markers end the call. A raw control character inside a
    string, such as a newline, means the text was not JSON after all (JSON
    escapes them): ``broken``, and the first marker of the call ended it, as in
    a body of another format. So a string that is never closed holds text back
    only until a newline, the value's end or the output's end."""

    __slots__ = ("pos", "json", "in_str", "esc", "depth", "over", "broken")

    def __init__(self):
        self.pos = 0  # characters of the body scanned
        self.json = None  # None: only whitespace so far
        self.in_str = self.esc = False
        self.depth = 0
        self.over = False  # the value closed, or the body is not JSON-shaped or not JSON
        self.broken = False  # JSON-shaped, but not JSON

    def scan(self, body: str, upto: int) -> None:
        i = self.pos
        while i < upto and not self.over:
            c = body[i]
            i += 1
            if self.json is None:
                if c in _WS:
                    continue
                self.json = c in "{["
                if not self.json:
                    self.over = True
                    break
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
                elif c < " ":
                    self.over = self.broken = True
            elif c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                self.over = self.depth <= 0
        self.pos = max(self.pos, i)

    def inside(self, body: str, j: int) -> bool:
        """Whether ``body[j]`` (where an end marker begins) is inside a string."""
        self.scan(body, j)
        return not self.over and self.in_str


class CallStream:
    """Splits a request's output text into content and tool call entries.

    ``feed`` takes each text delta (after stop strings) and returns the
    content that may be sent and the call entries: ``{"index", "name",
    "arguments"}`` begins call ``index`` (the request's calls are numbered
    from 0 in order), ``{"index", "arguments"}`` appends to its arguments
    text. A tail that may be the start of a marker is held back, as is
    trailing whitespace until more content follows (whitespace before and
    between calls is dropped; at the end it is kept only if no call was made).

    Whole calls (``stream`` false: ``tool_choice`` ``auto``): text from a start
    marker to its end marker is a call, parsed with the format's parser and
    returned in one entry; a call that does not parse is passed on as content,
    markers included, so nothing is lost.

    The end marker: in a JSON-shaped call (``{`` or ``[`` after the start
    marker) a marker inside one of the JSON's strings is part of the text, not
    the call's end (``_JsonStrings``), whole or streamed; in another format the
    first marker ends the call.

    Streamed calls (``stream`` true: ``required`` or a named function, where
    the grammar makes the text a valid json_tools call as it is produced):
    once a call's name is complete its header entry (name, arguments "") is
    returned, then its arguments text in fragments as it arrives, holding back
    only what may be the call's closing (``_closing_at``). The fragments
    assemble to ``raw_call``'s arguments, as the whole call would give. A call
    cut short (``max_tokens``, a stop string) ends with its arguments as far
    as they were generated; one cut before its name was complete (or inside
    its start marker) is dropped: the grammar writes nothing but calls, so
    that text is no one's content.

    ``cut``: the output ended inside a call that is not whole (cut before its
    end marker, and its text so far is not a complete call: a call reported
    with its arguments as far as they went, a whole call's text passed on as
    content, a streamed call dropped before its name).
    The front door then keeps the finish reason (``stop``, ``length``) rather
    than ``tool_calls``.

    Resume: the first ``skip_bytes`` bytes of content, the first
    ``skip_calls`` calls begun and the first ``skip_args`` bytes of the
    arguments of the last of them were delivered by an earlier worker and are
    not returned again.
    """

    def __init__(self, fmt: CallFormat, tools, skip_bytes: int = 0, skip_calls: int = 0,
                 skip_args: int = 0, stream: bool = False):
        self.fmt = fmt
        self.tools = tools
        self.stream = stream and fmt.start == START and fmt.end == END
        self.buf = ""
        self.in_call = False
        self.ws = ""  # held whitespace-only content
        self.n_calls = 0  # calls ended (including skipped ones)
        self.begun = 0  # calls begun: the index of the next one
        # The streamed call under way: its name once its header is out, where
        # its arguments start in buf, how many characters of them were returned,
        # and whether they are returned whole (not a JSON object).
        self.head: str | None = None
        self.args_at = -1
        self.args_sent = 0
        self.whole = False
        self.end_from = 0  # where to look for its end marker (past one inside a string)
        self.strings = _JsonStrings()  # of the call under way
        self.first_end = -1  # its first end marker, when that was inside a string
        self.cut = False
        self.skip_bytes = skip_bytes
        self.skip_calls = skip_calls
        self.skip_args = skip_args

    def _held(self, s: str) -> int:
        start = self.fmt.start
        for k in range(min(len(s), len(start) - 1), 0, -1):
            if start.startswith(s[-k:]):
                return k
        return 0

    def _content(self, s: str, out: list) -> None:
        # Trailing whitespace is held until more content follows (a call
        # drops it), however the text was cut into deltas.
        s = self.ws + s
        body = s.rstrip()
        self.ws = s[len(body):]
        if body:
            self._emit(body, out)

    def _emit(self, s: str, out: list) -> None:
        if self.skip_bytes:
            b = s.encode("utf-8")
            n = min(self.skip_bytes, len(b))
            self.skip_bytes -= n
            s = b[n:].decode("utf-8", errors="ignore")
        if s:
            out.append(s)

    def _entry(self, index: int, name: str | None, args: str, calls: list) -> None:
        """Return a call's header (``name`` set) or a fragment of its
        arguments, less what an earlier worker delivered."""
        if index < self.skip_calls:
            if index < self.skip_calls - 1:
                return
            name = None  # the header of the last call begun was delivered
            if self.skip_args and args:
                b = args.encode("utf-8")
                n = min(self.skip_args, len(b))
                self.skip_args -= n
                args = b[n:].decode("utf-8", errors="ignore")
        if name is None and not args:
            return
        e = {"index": index, "arguments": args}
        if name is not None:
            e["name"] = name
        calls.append(e)

    def _parse(self, body: str) -> list[dict]:
        if self.fmt.start == START and self.fmt.end == END:
            got = raw_call(body)
            if got is not None:
                return [{"name": got[0], "arguments": got[1]}]
        return _calls_of(self.fmt.parse(body, self.tools))

    def _open(self, body: str, calls: list) -> None:
        """Return what is certain of the streamed call under way, whose text
        so far is ``body``: its header once the name is complete, then its
        arguments but what may be the call's closing."""
        if self.head is None:
            m = _NAME.match(body)
            if m is None:
                return
            try:
                name = json.loads(m.group(1))
            except ValueError:
                return
            if not name:
                return
            self.head = name
            self.ws = ""  # whitespace before a call is not content
            self._entry(self.begun, name, "", calls)
            self.begun += 1
        if self.args_at < 0:
            m = _HEAD.match(body)
            if m is None:
                return
            self.args_at = m.end()
            self.whole = body[self.args_at] != "{"
        if self.whole:
            return
        sent = self.args_at + self.args_sent
        upto = _closing_at(body, sent, self.fmt.end)
        if upto > sent:
            self._entry(self.begun - 1, None, body[sent:upto], calls)
            self.args_sent = upto - self.args_at

    def _close(self, body: str, calls: list) -> bool:
        """End the streamed call whose text is ``body``: the rest of its
        arguments. Returns whether the call is whole (False: cut short)."""
        sent = body[self.args_at:self.args_at + self.args_sent] if self.args_at >= 0 else ""
        got = None if self.whole else raw_call(body)
        whole = True
        if got is not None:
            args = got[1]
        else:
            try:
                parsed = _calls_of(self.fmt.parse(body, self.tools))
                args = parsed[0]["arguments"] if len(parsed) == 1 else None
            except Exception:
                args = None
            if args is None or not args.startswith(sent):
                # Cut short: the arguments as far as they were generated.
                args = body[self.args_at:] if self.args_at >= 0 else ""
                whole = False
        self._entry(self.begun - 1, None, args[len(sent):], calls)
        self.n_calls += 1
        self.ws = ""
        self.head, self.args_at, self.args_sent, self.whole = None, -1, 0, False
        return whole

    def _call(self, body: str, closed: bool, out_content: list, calls: list) -> None:
        """A call's text from its start marker to its end marker (``closed``)
        or to the end of the output (where a call that is not whole was cut
        short: ``cut``)."""
        text = body
        if not closed:  # the output may end inside the end marker
            for k in range(len(self.fmt.end) - 1, 0, -1):
                if body.endswith(self.fmt.end[:k]):
                    body = body[:-k]
                    break
        if self.stream:
            self._open(body, calls)
            if self.head is not None:
                if not self._close(body, calls) and not closed:
                    self.cut = True
                return
            if not closed:
                # Cut before its name was complete: the grammar writes
                # nothing but calls, so this is no one's content.
                self.ws, self.cut = "", True
                return
        try:
            parsed = self._parse(body)
        except Exception:
            self._content(self.fmt.start + text + (self.fmt.end if closed else ""), out_content)
            if not closed:
                self.cut = True
            return
        self.ws = ""  # whitespace before or between calls is not content
        for c in parsed:
            self._entry(self.begun, c["name"], c["arguments"], calls)
            self.begun += 1
            self.n_calls += 1

    def _end_call(self) -> None:
        self.in_call, self.end_from, self.first_end = False, 0, -1
        self.strings = _JsonStrings()

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        self.buf += text
        content: list[str] = []
        calls: list[dict] = []
        start, end = self.fmt.start, self.fmt.end
        while True:
            if not self.in_call:
                i = self.buf.find(start)
                if i >= 0:
                    self._content(self.buf[:i], content)
                    self.buf = self.buf[i + len(start):]
                    self.in_call = True
                    continue
                keep = self._held(self.buf)
                if final and not self.stream:
                    keep = 0  # free text may end like a marker's beginning
                self._content(self.buf[:len(self.buf) - keep], content)
                self.buf = self.buf[len(self.buf) - keep:]
                if final and keep:
                    # Streamed calls: the output ended inside a start marker,
                    # a call cut short before it began; not content.
                    self.buf, self.cut = "", True
                break
            j = self.buf.find(end, self.end_from) if end else -1
            if j >= 0 and self.strings.inside(self.buf, j):
                if self.first_end < 0:
                    self.first_end = j
                self.end_from = j + len(end)  # the marker is inside a string of the arguments
                continue
            if j < 0 and end:  # not in what is here: the next search starts at its last chance
                self.end_from = max(self.end_from, len(self.buf) - len(end) + 1)
            if self.first_end >= 0 and not self.stream:  # (the grammar's calls are JSON)
                if j < 0:  # scan up to the next marker's earliest place
                    self.strings.scan(self.buf, len(self.buf) if final else self.end_from)
                if self.strings.broken:  # not JSON: the marker taken to be in a string ended the call
                    j = self.first_end
            if j >= 0:
                body, self.buf = self.buf[:j], self.buf[j + len(end):]
                self._end_call()
                self._call(body, True, content, calls)
                continue
            if final:
                body, self.buf = self.buf, ""
                self._end_call()
                self._call(body, False, content, calls)  # an unterminated call: parse what there is
            elif self.stream:
                self._open(self.buf, calls)
            break
        if final and self.ws:
            ws, self.ws = self.ws, ""
            if self.n_calls == 0:
                self._emit(ws, content)
        return "".join(content), calls
