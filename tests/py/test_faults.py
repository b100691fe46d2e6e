"""KRSERVE_WORKER_FAULT: a real worker crashes or hangs on the requests it names."""

from __future__ import annotations

import signal

import pytest

from krserve_worker import faults


def test_parse_rules():
    rules = faults.parse("segv-on-prompt:POISON; segv-after-tokens:3:LATE ;hang-on-prompt:HANG;segv-after-tokens:5")
    assert rules == [
        faults.Rule("segv-on-prompt", text="POISON"),
        faults.Rule("segv-after-tokens", text="LATE", tokens=3),
        faults.Rule("hang-on-prompt", text="HANG"),
        faults.Rule("segv-after-tokens", text="", tokens=5),
    ]


@pytest.mark.parametrize("spec,want", [
    ("segv-on-prompt", "needs the prompt text"),
    ("segv-after-tokens:0", "token count"),
    ("segv-after-tokens:x:TEXT", "token count"),
    ("explode:now", "unknown fault 'explode'"),
])
def test_bad_rules_are_refused(spec, want):
    with pytest.raises(faults.FaultSpecError, match=want):
        faults.parse(spec)


def test_rules_match_the_prompt_text():
    class Tok:
        def decode(self, ids):
            return "".join(chr(ord("a") + i) for i in ids)

    f = faults.Faults(faults.parse("segv-on-prompt:POISON;segv-after-tokens:2:bcd"), Tok())
    assert f.arm({"id": 1, "text": "no"}) is None
    armed = f.arm({"id": 2, "messages": [{"role": "user", "content": "a POISON pill"}]})
    assert [r.kind for r in armed.rules] == ["segv-on-prompt"]
    armed = f.arm({"id": 3, "prompt": [1, 2, 3]})  # decoded: "bcd"
    assert [r.kind for r in armed.rules] == ["segv-after-tokens"]
    assert not armed.after_token(1) and armed.after_token(2)


def _text_gen(rid, text, n):
    return {"t": "gen", "id": rid, "text": text, "max_tokens": n, "logit_bias": {0: -1e9, 1: -1e9, 2: -1e9}}


def test_segv_on_prompt_kills_the_worker(start_worker):
    w = start_worker(env={"KRSERVE_WORKER_FAULT": "segv-on-prompt:POISON"})
    w.hello()
    w.send(_text_gen(1, "an innocent prompt", 3))
    assert w.collect(1)[-1]["t"] == "done"
    w.send(_text_gen(2, "a POISON pill", 3))
    assert w.wait() == -signal.SIGSEGV
    err = w.stderr_text()
    assert "segv-on-prompt: request 2" in err and "Segmentation fault" in err


def test_segv_after_tokens_loses_only_the_done(start_worker):
    w = start_worker(env={"KRSERVE_WORKER_FAULT": "segv-after-tokens:4:LATE"})
    w.hello()
    w.send(_text_gen(1, "LATE crash", 10))
    frames = [w.next_for(1) for _ in range(4)]
    assert [f["t"] for f in frames] == ["tok"] * 4
    assert w.wait() == -signal.SIGSEGV
    assert not [m for m in w.all if m.get("id") == 1 and m["t"] != "tok"], "nothing after the 4th token"


def test_bad_fault_spec_stops_the_worker_at_start(start_worker):
    w = start_worker(env={"KRSERVE_WORKER_FAULT": "segv-on-prompt"})
    m = w.next_frame()
    assert m["t"] == "error" and m.get("id", 0) == 0 and "KRSERVE_WORKER_FAULT" in m["msg"]
    assert w.wait() != 0
