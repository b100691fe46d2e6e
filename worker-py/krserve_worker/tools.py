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


def _calls_of(parsed) -> list[dict]:
    items = parsed if isinstance(parsed, list) else [parsed]
    out = []
    for c in items:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise ValueError("a tool call needs a name")
        args = c.get("arguments", {})
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        out.append({"name": c["name"], "arguments": args})
    return out


class CallStream:
    """Splits a request's output text into content and tool calls.

    ``feed`` takes each text delta (after stop strings) and returns the
    content that may be sent and the calls completed. Text from a start
    marker to its end marker is a call, parsed with the format's parser; a
    call that does not parse is passed on as content, markers included, so
    nothing is lost. A tail that may be the start of a marker is held back, as
    is trailing whitespace until more content follows (whitespace before and
    between calls is dropped; at the end it is kept only if no call was made).

    Resume: the first ``skip_bytes`` bytes of content and the first
    ``skip_calls`` calls were delivered by an earlier worker and are not
    returned again.
    """

    def __init__(self, fmt: CallFormat, tools, skip_bytes: int = 0, skip_calls: int = 0):
        self.fmt = fmt
        self.tools = tools
        self.buf = ""
        self.in_call = False
        self.ws = ""  # held whitespace-only content
        self.n_calls = 0  # calls parsed (including skipped ones)
        self.skip_bytes = skip_bytes
        self.skip_calls = skip_calls

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

    def _call(self, body: str, out_content: list, calls: list) -> None:
        try:
            parsed = _calls_of(self.fmt.parse(body, self.tools))
        except Exception:
            self._content(self.fmt.start + body + (self.fmt.end if self.fmt.end else ""), out_content)
            return
        self.ws = ""  # whitespace before or between calls is not content
        for c in parsed:
            self.n_calls += 1
            if self.skip_calls:
                self.skip_calls -= 1
            else:
                calls.append(c)

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
                keep = 0 if final else self._held(self.buf)
                self._content(self.buf[:len(self.buf) - keep], content)
                self.buf = self.buf[len(self.buf) - keep:]
                break
            j = self.buf.find(end) if end else -1
            if j >= 0:
                body, self.buf = self.buf[:j], self.buf[j + len(end):]
                self.in_call = False
                self._call(body, content, calls)
                continue
            if final:
                body, self.buf = self.buf, ""
                self.in_call = False
                self._call(body, content, calls)  # an unterminated call: parse what there is
            break
        if final and self.ws:
            ws, self.ws = self.ws, ""
            if self.n_calls == 0:
                self._emit(ws, content)
        return "".join(content), calls
