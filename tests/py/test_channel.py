"""Channel protection: stray output from the worker never reaches the protocol
stream. With KRSERVE_WORKER_NOISE=1 the worker prints to sys.stdout, writes to
fd 1 with os.write and with libc write(2) after every decode step; all of it
must land on stderr while stdout carries only well-formed frames."""

from conftest import summarize
from krserve_worker import protocol


def test_noise_goes_to_stderr_and_frames_stay_clean(start_worker):
    w = start_worker(env={"KRSERVE_WORKER_NOISE": "1"})
    w.hello()
    nid = iter(range(1, 100))
    # One at a time, then four at once.
    results = []
    for prompt in ([5, 6, 7], [100, 200, 300]):
        rid = next(nid)
        w.send({"t": "gen", "id": rid, "prompt": prompt, "max_tokens": 12,
                "logit_bias": {2: -1e9}})
        results.append(summarize(w.collect(rid)))
    rids = [next(nid) for _ in range(4)]
    w.send(*[{"t": "gen", "id": r, "prompt": [10 + r, 20, 30], "max_tokens": 8,
              "logit_bias": {2: -1e9}, "stop": ["zz"]} for r in rids],
           {"t": "ping", "seq": 9})
    results += [summarize(w.collect(r)) for r in rids]
    for r in results:
        assert r["last"]["t"] == "done"
        assert r["last"]["reason"] in ("length", "stop")
    assert [len(r["ids"]) for r in results[:2]] == [12, 12]
    w.close_stdin()
    assert w.wait(30) == 0
    w.eof.wait(10)
    # stdout held frames and nothing else: re-encoding every parsed frame
    # reproduces the raw byte stream exactly.
    assert w.stream_error is None
    assert bytes(w.raw) == b"".join(protocol.encode(m) for m in w.all)
    err = w.stderr_text()
    assert "noise\n" in err and "c-noise\n" in err and "libc-noise\n" in err
    assert err.count("c-noise\n") >= 12 + 12 + 8
