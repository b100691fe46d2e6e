"""Protocol v4 encoding: byte-for-byte agreement with the Go vectors, framing errors."""

import json
import os
import struct

import msgpack
import pytest

from conftest import ROOT
from krserve_worker import channel, protocol

VECTORS = json.loads((ROOT / "ipc" / "testdata" / "vectors.json").read_text())
BY_NAME = {v["name"]: bytes.fromhex(v["hex"]) for v in VECTORS}


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_vector_roundtrip(name):
    raw = BY_NAME[name]
    (n,) = struct.unpack(">I", raw[:4])
    assert n == len(raw) - 4
    msg = protocol.decode_body(raw[4:])
    assert protocol.encode(msg) == raw


def test_all_message_kinds_have_vectors():
    kinds = {protocol.decode_body(r[4:])["t"] for r in BY_NAME.values()}
    assert kinds == {"hello", "gen", "cancel", "ping", "shutdown",
                     "tok", "done", "error", "pong"}


def test_constructors_match_vectors():
    P = protocol
    assert P.hello(pid=4242, model="/models/smollm2", ctx=8192, vocab=49152, eos=[2],
                   caps=["resume", "stop", "penalties", "logit_bias", "seed", "prompt_cache"],
                   versions={"python": "3.11.7", "mlx_lm": "0.32.2", "mlx": "0.32.4",
                             "krserve_worker": "0.1.0"}, cache_bytes=3 << 30) == BY_NAME["hello"]
    assert P.tok(7, [504, 11], "Paris é 🙂") == BY_NAME["tok"]
    assert P.tok(7, [216], "") == BY_NAME["tok_held"]
    assert P.tok(15, [29], "", calls=[{"index": 0, "name": "get_weather", "arguments": '{"city":"Paris"}'}]) \
        == BY_NAME["tok_calls"]
    # Call entries in fragments (v4): index 0 and an empty name are omitted.
    assert P.tok(16, [1521], "", calls=[{"index": 1, "arguments": '"}'},
                                        {"index": 2, "name": "get_time", "arguments": ""},
                                        {"index": 2, "arguments": '{"zone":"'}]) == BY_NAME["tok_call_frags"]
    assert P.done(16, "stop", 120, 31, calls=[{"index": 2, "arguments": 'UTC"}'}]) == BY_NAME["done_call_frag"]
    # A call cut short (optional in v4: absent means every call is whole).
    assert P.done(17, "stop", 120, 9, calls=[{"index": 0, "arguments": '{"unit":"'}],
                  cut_call=True) == BY_NAME["done_cut_call"]
    assert "cut_call" not in protocol.decode_body(BY_NAME["done_call_frag"][4:])
    assert P.tok(12, [504, 11], "Paris é", lps=[-0.25, -1.5], toks=[" Paris", " é"],
                 top_lps=[[-0.25, -2], [-1.5, -1.75]],
                 top_toks=[[" Paris", " Lyon"], [" é", "\ufffd"]]) == BY_NAME["tok_logprobs"]
    assert P.done(7, "stop", 5, 12, "tail") == BY_NAME["done"]
    assert P.done(8, "length", 5, 10) == BY_NAME["done_length"]
    assert P.done(14, "stop", 1500, 40, cached=1399) == BY_NAME["done_cached"]
    assert P.error(7, "invalid", "top_p must be in [0, 1]") == BY_NAME["error"]
    assert P.error(0, "internal", "model failed to load") == BY_NAME["error_fatal"]
    assert P.pong(3, 4, 123456789, 5000000000, 300000000, cache=1 << 31,
                  evicted=17) == BY_NAME["pong"]


def test_encoder_follows_go_types_and_omits_zeros():
    # Python ints for Go float64 fields become float64; zero values are omitted.
    a = protocol.encode({"t": "gen", "id": 9, "prompt": [5], "max_tokens": 1,
                         "temperature": 0, "top_p": 0.0, "stop": [], "logit_bias": {},
                         "has_seed": False, "seed": 0, "text": ""})
    assert a == BY_NAME["gen_greedy"]
    b = protocol.decode_body(protocol.encode({"t": "gen", "id": 1, "prompt": [1],
                                              "max_tokens": 1, "temperature": 1})[4:])
    assert isinstance(b["temperature"], float)
    body = protocol.encode({"t": "gen", "id": 1, "temperature": 1})[4:]
    assert b"\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00" in body  # float64 1.0
    with pytest.raises(KeyError):
        protocol.encode({"t": "tok", "bogus": 1})


def test_key_order_is_global():
    # Keys come in the Go struct order whatever order the dict has.
    m = {"text": "x", "ids": [1], "id": 3, "t": "tok"}
    assert list(protocol.decode_body(protocol.encode(m)[4:])) == ["t", "id", "text", "ids"]


def _frames_from(data: bytes):
    r, w = os.pipe()
    try:
        os.write(w, data)
        os.close(w)
        w = None
        reader = channel.FrameReader(r)
        out = []
        while True:
            m = reader.read()
            if m is None:
                return out
            out.append(m)
    finally:
        os.close(r)
        if w is not None:
            os.close(w)


def test_reader_reads_back_to_back_frames():
    data = b"".join(BY_NAME[n] for n in sorted(BY_NAME))
    msgs = _frames_from(data)
    assert [protocol.encode(m) for m in msgs] == [BY_NAME[n] for n in sorted(BY_NAME)]
    assert _frames_from(b"") == []


def _body(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize(
    "data, what",
    [
        (struct.pack(">I", protocol.MAX_FRAME + 1), "outside"),
        (struct.pack(">I", 0xFFFFFFFF) + b"x" * 10, "outside"),
        (struct.pack(">I", 0), "outside"),
        (b"\x00\x00", "truncated"),
        (BY_NAME["ping"][:-3], "truncated"),
        (struct.pack(">I", 3) + _body([1, 2]), "not a msgpack map"),
        (struct.pack(">I", 1) + b"\x05", "not a msgpack map"),
        (struct.pack(">I", len(_body({"seq": 1}))) + _body({"seq": 1}), "'t'"),
        (struct.pack(">I", len(_body({"t": 5}))) + _body({"t": 5}), "'t'"),
        (struct.pack(">I", len(_body({"t": ""}))) + _body({"t": ""}), "'t'"),
        (struct.pack(">I", len(_body({"t": "ping"})) + 1) + _body({"t": "ping"}) + b"\x01",
         "trailing"),
        (struct.pack(">I", 3) + b"\x81\xa1t", "undecodable"),  # map cut short
        (struct.pack(">I", 4) + b"\x81\xa1t\xc1", "undecodable"),  # reserved byte
        (struct.pack(">I", 5) + b"\x81\xa1t\xa1\xff", "undecodable"),  # bad utf-8
    ],
)
def test_framing_errors(data, what):
    with pytest.raises(protocol.ProtocolError, match=what):
        _frames_from(data)


def test_oversized_length_rejected_before_reading_body():
    # Only the header is available: the length is refused at once, without
    # waiting for (or allocating) 16 MiB + 1 bytes.
    assert protocol.split_frame(b"\x00\x00") is None
    with pytest.raises(protocol.ProtocolError):
        protocol.split_frame(struct.pack(">I", protocol.MAX_FRAME + 1))
    assert protocol.split_frame(struct.pack(">I", protocol.MAX_FRAME)) == (
        protocol.MAX_FRAME, protocol.MAX_FRAME + 4)


def test_writer_writes_everything():
    r, w = os.pipe()
    try:
        writer = channel.FrameWriter(w)
        payload = protocol.tok(1, list(range(70000)), "x" * 100000)
        got = bytearray()
        import threading

        t = threading.Thread(target=writer.write, args=(payload,))
        t.start()
        while len(got) < len(payload):
            got += os.read(r, 1 << 16)
        t.join()
        assert bytes(got) == payload
        writer.close()
        writer.write(b"ignored after close")
    finally:
        os.close(r)
        os.close(w)
