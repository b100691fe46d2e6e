"""krserve_worker.ranks: what a group of ranks checks before it starts, and how
rank 0's items travel to the followers (no processes here: test_group.py runs
real groups)."""

from __future__ import annotations

import json

import pytest

from krserve_worker import ranks
from krserve_worker.reader import CONSTRAINT


def model(tmp_path, **cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_sizes_that_divide_the_heads_pass(tmp_path, size):
    d = model(tmp_path, model_type="llama", num_attention_heads=8, num_key_value_heads=4)
    assert ranks.check(d, size) == "mlx_lm.models.llama.Model"


@pytest.mark.parametrize("heads,kv,size,fit", [
    (4, 2, 3, "1, 2"),        # the tiny model
    (9, 3, 2, "1, 3"),        # SmolLM2-135M
    (8, 8, 3, "1, 2, 4, 8"),  # no GQA: kv defaults to heads too
])
def test_sizes_that_do_not_divide_are_refused(tmp_path, heads, kv, size, fit):
    d = model(tmp_path, model_type="llama", num_attention_heads=heads, num_key_value_heads=kv)
    with pytest.raises(ranks.GroupError) as e:
        ranks.check(d, size)
    assert f"{heads} attention heads and {kv} KV heads" in str(e.value)
    assert f"group sizes that fit: {fit}" in str(e.value)


def test_heads_in_text_config(tmp_path):
    d = model(tmp_path, model_type="llama", text_config={"num_attention_heads": 6, "num_key_value_heads": 3})
    with pytest.raises(ranks.GroupError, match="6 attention heads and 3 KV heads"):
        ranks.check(d, 2)


def test_model_class_without_shard(tmp_path):
    d = model(tmp_path, model_type="cohere", num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ranks.GroupError, match=r"cohere.*has no tensor-parallel shard\(\)"):
        ranks.check(d, 2)


def test_unknown_model_type(tmp_path):
    d = model(tmp_path, model_type="no-such-model", num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ranks.GroupError, match="mlx-lm does not know this model"):
        ranks.check(d, 2)


def test_check_command(tmp_path, capsys):
    d = model(tmp_path, model_type="llama", num_attention_heads=4, num_key_value_heads=2)
    assert ranks._main(["--check", d, "--group-size", "2"]) == 0
    assert ranks._main(["--check", d, "--group-size", "3"]) == 2
    assert "group sizes that fit: 1, 2" in capsys.readouterr().out


def test_items_travel_without_their_matcher():
    gen = {"t": "gen", "id": 7, "text": "hi", "_prompt_ids": [1, 2], CONSTRAINT: object(),
           "logit_bias": {5: 1.5}}
    wire = ranks._wire(("msgs", [gen, {"t": "cancel", "id": 3}]))
    assert wire == ("msgs", [{"t": "gen", "id": 7, "text": "hi", "_prompt_ids": [1, 2], "logit_bias": {5: 1.5}},
                             {"t": "cancel", "id": 3}])
    assert CONSTRAINT in gen  # rank 0's own copy keeps it
    assert ranks._wire(("exit", 0, "shutdown")) == ("exit", 0, "shutdown")


def test_link_round_trip():
    """One message per loop on the link: empty loops, gens (int map keys),
    rank 0's step time estimates, exit; EOF when rank 0 is gone."""
    import socket

    a, b = socket.socketpair()
    leader = ranks.Group.__new__(ranks.Group)
    leader.links = [a]
    follower = ranks.Group.__new__(ranks.Group)
    follower.link = b.makefile("rb")
    gen = {"t": "gen", "id": 7, "_prompt_ids": [1, 2, 3], "logit_bias": {5: -1.0}, "temperature": 0.5,
           "messages": [{"role": "user", "content": "héllo"}], CONSTRAINT: None}
    leader.share([], 0)
    leader.share([("msgs", [gen])], 17, (1 / 7000, 0.0123456789))
    leader.share([("exit", 0, "shutdown")], 2**60)
    assert follower.receive() == (0, [], (None, None))
    assert follower.receive() == (17, [["msgs", [{k: v for k, v in gen.items() if k != CONSTRAINT}]]],
                                  (1 / 7000, 0.0123456789))  # floats exactly
    assert follower.receive() == (2**60, [["exit", 0, "shutdown"]], (None, None))
    a.close()
    assert follower.receive() is None


class _Req:
    def __init__(self, rid):
        self.p = type("P", (), {"id": rid})()


def test_a_follower_that_sampled_otherwise_exits():
    """The token digest: the same tokens in the same order give the same
    digest; one other token makes the follower leave with EXIT_DIVERGED."""

    class Base:
        def on_token(self, req, token, finish_reason, out, lp=None):
            pass

    class Rank(ranks._Digest, Base):
        pass

    a, b = Rank(), Rank()
    for rid, tok in [(1, 5), (2, 9), (1, 6)]:
        a.on_token(_Req(rid), tok, None, [])
        b.on_token(_Req(rid), tok, None, [])
    assert a.digest == b.digest != 0
    b.on_token(_Req(2, ), 10, None, [])
    a.on_token(_Req(2), 11, None, [])
    assert a.digest != b.digest

    f = ranks.Follower.__new__(ranks.Follower)
    f.digest = b.digest
    f.gen = type("Gen", (), {"estimates": (None, None)})()
    f.group = type("G", (), {"rank": 1, "receive": lambda self: (a.digest, [["msgs", []]], (None, None))})()
    assert f.take(idle=False) == [("exit", ranks.EXIT_DIVERGED, "diverged from rank 0")]
    f.group.receive = lambda: (b.digest, [["msgs", []]], (0.5, 0.25))
    assert f.take(idle=False) == [["msgs", []]]
    assert f.gen.estimates == (0.5, 0.25)  # it decides with rank 0's step times
