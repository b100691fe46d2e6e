"""The reader thread and tokenization.

The reader thread reads and parses the supervisor's frames and queues them
for the main thread, except ``ping``, which it answers itself (``pong``, with
the values the main thread publishes in ``Shared``). It tokenizes the text or
chat messages of a ``gen`` and compiles its grammar before queueing it
(tokenizers and llguidance only, never MLX), so tokenizing never waits for a
decode step and the main thread gets ids and a ``Constraint``; a prompt it
refuses is answered from here.
"""

from __future__ import annotations

import os
import queue
import resource
import sys
import threading

from . import grammar, protocol, tools
from .channel import FrameReader, FrameWriter
from .log import EXIT_OK, EXIT_PROTOCOL, log
from .params import InvalidPrompt, InvalidRequest
from .prompt_cache import system_end
from .protocol import ProtocolError


def read_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024


class Shared:
    """Values the main thread publishes for ``pong`` (plain ints: the reader
    thread never touches MLX)."""

    def __init__(self):
        self.active = 0
        self.mem_active = 0
        self.mem_peak = 0
        self.cache = 0  # bytes the prompt cache holds
        self.evicted = 0  # prompt cache entries evicted so far
        # Gens the reader has read and not yet queued (it alone writes this;
        # the main thread waits for them before a prefill step: Worker.gather).
        self.tokenizing = 0


def _need_id(msg) -> int:
    rid = msg.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool) or rid <= 0:
        raise ProtocolError(f"{msg['t']} frame without a valid id: {rid!r}")
    return rid


# -- reader thread -------------------------------------------------------------


class Reader(threading.Thread):
    def __init__(self, reader: FrameReader, writer: FrameWriter, q: queue.Queue,
                 tokenizer, shared: Shared, grammars=None, checkpoints: bool = False):
        super().__init__(name="krserve-reader", daemon=True)
        self.reader = reader
        self.writer = writer
        self.q = q
        self.tokenizer = tokenizer
        self.shared = shared
        self.grammars = grammars  # grammar.Grammars, or None when llguidance is missing
        self.checkpoints = checkpoints  # find where chats' system prompts end

    def run(self):
        try:
            while True:
                batch = self.reader.read_batch()
                if batch is None:
                    self.writer.close()  # nobody is listening any more
                    self.q.put(("exit", EXIT_OK, "stdin closed"))
                    return
                work = []
                gens = sum(1 for msg in batch if msg.get("t") == "gen")
                self.shared.tokenizing += gens
                for msg in batch:
                    t = msg["t"]
                    if t == "ping":
                        self.pong(msg)
                    elif t == "shutdown":
                        self.writer.close()  # send nothing more
                        self.q.put(("exit", EXIT_OK, "shutdown"))
                        return
                    elif t == "gen":
                        _need_id(msg)
                        if self.tokenize(msg):
                            work.append(msg)
                    elif t == "cancel":
                        _need_id(msg)
                        work.append(msg)
                    else:
                        log(f"ignoring frame of unknown type {t!r}")
                self.shared.tokenizing -= gens
                if work:
                    # One queue item per read: gens written together are
                    # drained (and inserted) together.
                    self.q.put(("msgs", work))
        except ProtocolError as e:
            log(f"protocol error from supervisor: {e}")
            self.q.put(("exit", EXIT_PROTOCOL, str(e)))
        except OSError as e:
            log(f"channel error: {e!r}")
            self.q.put(("exit", EXIT_PROTOCOL, repr(e)))
        except BaseException as e:  # never die silently
            log(f"reader thread crashed: {e!r}")
            self.q.put(("exit", EXIT_PROTOCOL, repr(e)))

    def constraint(self, msg, treq):
        """``Constraint`` for a gen: its grammar's matcher (advanced over the
        resumed tokens) and how its calls are parsed; None for a free gen."""
        schema = msg.get("schema", "")
        fmt = None
        if treq is not None and treq.choice != "none":
            model_fmt = tools.model_format(self.tokenizer)
            fmt = model_fmt or tools.FALLBACK
            if treq.constrained and not tools.grammar_is_native(model_fmt):
                fmt = tools.FALLBACK  # the grammar writes json_tools calls
        if not schema and not (treq is not None and treq.constrained):
            return Constraint(None, fmt, treq) if fmt else None
        if self.grammars is None:
            raise InvalidRequest("structured output needs llguidance, which this worker "
                                 "could not load (see its log)")
        if treq is not None and treq.constrained:  # the calls' grammar wins over a schema
            matcher = tools.call_matcher(self.grammars, treq)
        else:
            matcher = self.grammars.schema_matcher(schema)
        grammar.replay(matcher, msg.get("resume") or [])
        return Constraint(matcher, fmt, treq)

    def pong(self, msg):
        seq = msg.get("seq", 0)
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ProtocolError(f"ping with invalid seq {seq!r}")
        s = self.shared
        self.writer.write(protocol.pong(seq, s.active, s.mem_active, s.mem_peak, read_rss(),
                                        cache=s.cache, evicted=s.evicted))

    def tokenize(self, msg) -> bool:
        """Tokenize a gen's text or messages into ``msg[TOKENIZED]`` and
        compile its grammar (``schema``, or the calls a ``tool_choice``
        demands) into ``msg[CONSTRAINT]``. A gen of prompt ids passes as it
        is; one without is a text gen (an empty text is omitted on the wire).
        Reports whether the gen goes on to the main thread; a refusal is
        answered here."""
        rid = msg["id"]
        try:
            treq = tools.parse_tool_request(msg)
            if treq is not None and not msg.get("messages"):
                raise InvalidRequest("tools need a chat prompt (messages)")
            if msg.get("prompt"):
                if "text" in msg or "messages" in msg:
                    raise InvalidRequest("a gen carries prompt ids or text or messages, not both")
            else:
                msg[TOKENIZED] = tokenize(self.tokenizer, msg, treq, self.checkpoints)
            msg[CONSTRAINT] = self.constraint(msg, treq)
            return True
        except InvalidRequest as e:
            answer = protocol.error(rid, e.code, str(e))
        except Exception as e:  # tokenizer/template failure
            log(f"tokenizing the prompt of {rid} failed: {e!r}")
            answer = protocol.error(rid, InvalidPrompt.code, f"tokenizing the prompt failed: {e}"[:1000])
        self.writer.write(answer)
        return False


# The keys under which the reader thread leaves a gen's tokenized prompt and
# its Constraint, and where its system prompt ends (not wire keys: they never
# leave the process).
TOKENIZED = "_prompt_ids"
CONSTRAINT = "_constraint"
SYSTEM_END = "_system_end"


class Constraint:
    """What the reader thread prepared for a constrained or tool-calling gen:
    the grammar's ``LLMatcher`` (None: free output), the ``tools.CallFormat``
    its calls are parsed with (None: no tool calls) and the ``ToolRequest``."""

    __slots__ = ("matcher", "fmt", "treq")

    def __init__(self, matcher, fmt, treq):
        self.matcher, self.fmt, self.treq = matcher, fmt, treq


def _check_message(m) -> dict:
    if not isinstance(m, dict):
        raise InvalidRequest("each message must be a map with role and content")
    role, content = m.get("role", ""), m.get("content", "")
    if not isinstance(role, str) or not isinstance(content, str):
        raise InvalidRequest("message role and content must be strings")
    calls = m.get("tool_calls") or []
    if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str)
            and isinstance(c.get("arguments", ""), str) for c in calls):
        raise InvalidRequest("message tool_calls must be a list of {id, name, arguments}")
    if not isinstance(m.get("tool_call_id", ""), str):
        raise InvalidRequest("message tool_call_id must be a string")
    return m


def tokenize(tokenizer, msg, treq=None, checkpoints: bool = False) -> list[int]:
    """A gen's prompt as ids: the chat template (with the generation prompt)
    applied to ``messages`` when present, with the tools of ``treq``
    (tools.chat_messages), else ``text`` encoded (``special`` adds the
    tokenizer's special tokens, such as BOS). With ``checkpoints``, a chat's
    system prompt end goes to ``msg[SYSTEM_END]`` (prompt cache)."""
    messages = msg.get("messages") or []
    if messages:
        if not isinstance(messages, list):
            raise InvalidRequest("messages must be a list")
        chat, kwargs = tools.chat_messages(tokenizer, [_check_message(m) for m in messages], treq)
        if not getattr(tokenizer, "has_chat_template", False):
            raise InvalidPrompt("the model has no chat template")
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                            **kwargs)
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if checkpoints:
            msg[SYSTEM_END] = system_end(tokenizer, chat, ids, **kwargs)
    else:
        text = msg.get("text", "")
        if not isinstance(text, str):
            raise InvalidRequest("text must be a string")
        special = msg.get("special", False)
        ids = tokenizer.encode(text, add_special_tokens=bool(special))
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]
