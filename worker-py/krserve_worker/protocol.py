"""Message encoding for protocol v4 (docs/protocol.md), byte-compatible with Go.

The Go side (``ipc.Message``) is one struct for every message type, encoded with
``omitempty``, compact ints and float64 floats; its field order is the wire
order. ``KEY_ORDER`` mirrors it. Within a message, keys therefore always come in
this global order and zero values are omitted.

Nested maps follow the Go encoder too: ``map[string]string`` (``versions``) is
written with sorted keys (``SetSortMapKeys``), while ``map[int32]float64``
(``logit_bias``) is written in Go's map iteration order, so the Python encoder
keeps the order it was given (a decoded frame re-encodes byte for byte).
``messages`` entries are a struct in Go: always ``role`` then ``content``, then
``tool_calls`` and ``tool_call_id`` when set; a tool call (in a message's
``tool_calls`` and a tok's ``calls``) is ``id``, ``index`` and ``name`` when
set, then ``arguments`` always.

This module imports only the standard library and msgpack.
"""

from __future__ import annotations

import struct

import msgpack

VERSION = 4
MAX_FRAME = 16 << 20  # bytes of body, checked before allocating

CAPS = ["resume", "stop", "penalties", "logit_bias", "seed", "schema", "tools"]
CAP_PROMPT_CACHE = "prompt_cache"  # advertised when the worker's prompt cache is on

# Wire order of every key (Go: ipc.Message field order).
KEY_ORDER = (
    "t",
    # hello
    "v", "pid", "model", "ctx", "vocab", "eos", "caps", "versions", "cache_bytes",
    "id", "seq",
    # gen
    "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
    "has_seed", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "logit_bias", "stop", "resume", "sent", "logprobs", "top_logprobs",
    # gen's prompt as text or chat messages (text: also tok and done)
    "text", "messages", "special",
    # gen: structured output and tools (v3)
    "schema", "tools", "tool_choice", "tool_name", "one_call", "sent_calls",
    "sent_args",  # v4
    # tok
    "ids", "lps", "toks", "top_lps", "top_toks",
    # done
    "reason", "ptoks", "ctoks", "cached",
    # tok: tool calls (v3), in fragments (v4)
    "calls",
    # done: the output ended inside a tool call that is not whole (v4, optional)
    "cut_call",
    # error
    "code", "msg",
    # pong
    "active", "mem_active", "mem_peak", "rss", "cache", "evicted",
)
_KEY_RANK = {k: i for i, k in enumerate(KEY_ORDER)}

# Go field types, to encode Python values the way Go would.
_FLOAT_KEYS = frozenset(
    {"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
     "frequency_penalty"}
)
_BOOL_KEYS = frozenset({"has_seed", "special", "logprobs", "one_call", "cut_call"})
_STR_KEYS = frozenset({"t", "model", "text", "reason", "code", "msg", "schema", "tools",
                       "tool_choice", "tool_name"})
_INT_KEYS = frozenset(
    {"v", "pid", "ctx", "vocab", "id", "seq", "max_tokens", "top_k", "seed", "sent",
     "top_logprobs", "sent_calls", "sent_args",
     "ptoks", "ctoks", "cached", "active", "mem_active", "mem_peak", "rss",
     "cache_bytes", "cache", "evicted"}
)
_INT_LIST_KEYS = frozenset({"eos", "prompt", "resume", "ids"})
_STR_LIST_KEYS = frozenset({"caps", "stop"})


class ProtocolError(Exception):
    """A malformed frame: the peer is broken (the worker exits with status 3)."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_zero(v) -> bool:
    if v is None or v is False:
        return True
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v == 0
    if isinstance(v, (str, bytes, list, tuple, dict)):
        return len(v) == 0
    return False


def _normalize(key: str, v):
    """Coerce a Python value to what Go's field type would put on the wire."""
    if key in _FLOAT_KEYS:
        return float(v)
    if key in _BOOL_KEYS:
        return bool(v)
    if key in _INT_KEYS:
        if not _is_int(v):
            raise TypeError(f"{key}: expected int, got {type(v).__name__}")
        return v
    if key in _STR_KEYS:
        if not isinstance(v, str):
            raise TypeError(f"{key}: expected str, got {type(v).__name__}")
        return v
    if key in _INT_LIST_KEYS:
        return [int(x) for x in v]
    if key in _STR_LIST_KEYS:
        return [str(x) for x in v]
    if key == "lps":  # []float64
        return [float(x) for x in v]
    if key == "toks":
        return [str(x) for x in v]
    if key == "top_lps":  # [][]float64
        return [[float(x) for x in row] for row in v]
    if key == "top_toks":
        return [[str(x) for x in row] for row in v]
    if key == "versions":  # map[string]string, sorted by Go
        return {str(k): str(v[k]) for k in sorted(v, key=str)}
    if key == "logit_bias":  # map[int32]float64, Go map order: keep ours
        return {int(k): float(x) for k, x in v.items()}
    if key == "messages":  # []ChatMessage: role, content; tool_calls, tool_call_id when set
        out = []
        for m in v:
            e = {"role": m.get("role", ""), "content": m.get("content", "")}
            if m.get("tool_calls"):
                e["tool_calls"] = _calls(m["tool_calls"])
            if m.get("tool_call_id"):
                e["tool_call_id"] = str(m["tool_call_id"])
            out.append(e)
        return out
    if key == "calls":  # []ToolCall
        return _calls(v)
    raise KeyError(f"unknown message key {key!r}")


def _calls(v) -> list[dict]:
    """[]ToolCall as Go writes it: id, index and name when set, then arguments."""
    out = []
    for c in v:
        e = {"id": str(c["id"])} if c.get("id") else {}
        if c.get("index"):
            if not _is_int(c["index"]):
                raise TypeError(f"tool call index: expected int, got {type(c['index']).__name__}")
            e["index"] = c["index"]
        if c.get("name"):
            e["name"] = str(c["name"])
        e["arguments"] = str(c.get("arguments", ""))
        out.append(e)
    return out


def encode_body(msg: dict) -> bytes:
    """Encode one message (a dict with ``t``) as a msgpack map body."""
    if not isinstance(msg.get("t"), str) or not msg["t"]:
        raise ValueError("message needs a non-empty str 't'")
    unknown = [k for k in msg if k not in _KEY_RANK]
    if unknown:
        raise KeyError(f"unknown message keys {unknown!r}")
    ordered = {}
    for k in sorted(msg, key=_KEY_RANK.__getitem__):
        v = msg[k]
        if _is_zero(v):
            continue
        ordered[k] = _normalize(k, v)
    return msgpack.packb(ordered, use_bin_type=True)


def frame(body: bytes) -> bytes:
    """Prefix a body with its 4-byte big-endian length."""
    n = len(body)
    if n == 0 or n > MAX_FRAME:
        raise ValueError(f"frame body of {n} bytes outside 1..{MAX_FRAME}")
    return struct.pack(">I", n) + body


def encode(msg: dict) -> bytes:
    """Encode a message as a complete frame (length prefix included)."""
    return frame(encode_body(msg))


def _is_map_header(b: int) -> bool:
    return (b & 0xF0) == 0x80 or b in (0xDE, 0xDF)


def decode_body(body: bytes) -> dict:
    """Decode one frame body; any malformation raises ProtocolError."""
    if not body:
        raise ProtocolError("empty frame body")
    if not _is_map_header(body[0]):
        raise ProtocolError(f"frame body is not a msgpack map (first byte 0x{body[0]:02x})")
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=False, use_list=True)
    except msgpack.ExtraData as e:
        raise ProtocolError(f"{len(e.extra)} trailing bytes after frame map") from None
    except Exception as e:  # OutOfData, FormatError, UnicodeDecodeError, ...
        raise ProtocolError(f"undecodable frame: {type(e).__name__}: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("frame body is not a msgpack map")
    t = msg.get("t")
    if not isinstance(t, str) or not t:
        raise ProtocolError("frame without a str message type 't'")
    return msg


def split_frame(buf) -> tuple[int, int] | None:
    """Inspect the start of ``buf``: None if the 4-byte header is incomplete, else
    ``(body_length, frame_length)``. Raises ProtocolError for a zero or oversized
    length, before anything is allocated for the body."""
    if len(buf) < 4:
        return None
    (n,) = struct.unpack_from(">I", buf, 0)
    if n == 0 or n > MAX_FRAME:
        raise ProtocolError(f"frame length {n} outside 1..{MAX_FRAME}")
    return n, 4 + n


# -- worker -> supervisor constructors (each returns a complete frame) ---------


def hello(*, v: int = VERSION, pid: int, model: str, ctx: int, vocab: int,
          eos: list[int], caps: list[str] = CAPS, versions: dict[str, str],
          cache_bytes: int = 0) -> bytes:
    return encode({"t": "hello", "v": v, "pid": pid, "model": model, "ctx": ctx,
                   "vocab": vocab, "eos": list(eos), "caps": list(caps),
                   "versions": versions, "cache_bytes": cache_bytes})


def tok(id: int, ids: list[int], text: str = "", lps=None, toks=None, top_lps=None,
        top_toks=None, calls=None) -> bytes:
    """``lps``/``toks``/``top_lps``/``top_toks``: per-token logprob data, one
    entry per id (only when the gen asked for ``logprobs``). ``calls``: tool
    call entries these tokens produced: ``{"index", "name", "arguments"}``
    begins call ``index``, ``{"index", "arguments"}`` appends to its arguments."""
    m = {"t": "tok", "id": id, "ids": ids, "text": text, "calls": calls}
    if lps:
        m.update(lps=lps, toks=toks, top_lps=top_lps, top_toks=top_toks)
    return encode(m)


def done(id: int, reason: str, ptoks: int, ctoks: int, text: str = "", calls=None,
         cached: int = 0, cut_call: bool = False) -> bytes:
    """``cached``: of the ``ptoks`` prefilled, how many came from the prompt
    cache. ``cut_call``: the output ended inside a tool call that is not whole
    (its finish reason is then not ``tool_calls``)."""
    return encode({"t": "done", "id": id, "reason": reason, "ptoks": ptoks,
                   "ctoks": ctoks, "cached": cached, "text": text, "calls": calls,
                   "cut_call": cut_call})


def error(id: int, code: str, msg: str) -> bytes:
    return encode({"t": "error", "id": id, "code": code, "msg": msg})


def pong(seq: int, active: int, mem_active: int, mem_peak: int, rss: int,
         cache: int = 0, evicted: int = 0) -> bytes:
    """``cache``: bytes the prompt cache holds; ``evicted``: entries it has
    evicted since the worker started."""
    return encode({"t": "pong", "seq": seq, "active": active, "mem_active": mem_active,
                   "mem_peak": mem_peak, "rss": rss, "cache": cache, "evicted": evicted})
