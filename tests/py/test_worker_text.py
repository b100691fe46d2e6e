"""TextStream (stop strings, hold-back, resume bookkeeping) with a fake
detokenizer, plus the real BPE streaming detokenizer of the tiny model."""

import pytest

from krserve_worker.textstream import TextStream


class CharDetok:
    """A fake streaming detokenizer: token i is the i-th string of a table."""

    def __init__(self, table):
        self.table = table
        self.text = ""
        self.offset = 0

    def add_token(self, t):
        self.text += self.table[t]

    def finalize(self):
        pass

    @property
    def last_segment(self):
        s = self.text[self.offset:]
        self.offset = len(self.text)
        return s


def stream(pieces, stops, final=True):
    table = list(pieces)
    ts = TextStream(CharDetok(table), stops)
    out = []
    for i in range(len(table)):
        ts.add(i)
        text, stopped = ts.take()
        out.append(text)
        if stopped:
            return out, True
    if final:
        ts.finalize()
        out.append(ts.take(final=True)[0])
    return out, False


def test_no_stops_passes_everything():
    assert stream(["ab", "c", "", "de"], []) == (["ab", "c", "", "de", ""], False)


def test_stop_across_pieces_is_cut_and_not_leaked():
    out, stopped = stream(["hello wo", "r", "ld and more"], ["world"])
    assert stopped and "".join(out) == "hello "
    assert out == ["hello ", "", ""]


def test_prefix_is_held_then_released():
    out, stopped = stream(["abc<", "|i", "x", "y"], ["<|im_end|>"])
    assert not stopped
    assert out == ["abc", "", "<|ix", "y", ""]


def test_held_tail_flushed_at_the_end():
    out, stopped = stream(["abc<|im"], ["<|im_end|>"])
    assert out == ["abc", "<|im"] and not stopped


def test_earliest_match_wins():
    out, stopped = stream(["xx BBB AAA"], ["AAA", "BBB"])
    assert stopped and "".join(out) == "xx "


def test_stop_inside_one_piece():
    out, stopped = stream(["ab\n\ncd"], ["\n\n"])
    assert stopped and out == ["ab"]


def test_overlapping_candidates():
    # "aab": the held "a" must not hide the match starting one char later.
    out, stopped = stream(["a", "a", "b"], ["ab"])
    assert stopped and "".join(out) == "a"


def test_replay_marks_sent_bytes():
    ts = TextStream(CharDetok(["é", "🙂x", "yz"]), [])
    ts.replay([0, 1], 2 + 4)  # "é🙂" delivered, "x" not
    ts.add(2)
    assert ts.take() == ("xyz", False)


@pytest.mark.parametrize("sent", [1, 3, 99])
def test_replay_rejects_bad_sent(sent):
    ts = TextStream(CharDetok(["é", "🙂"]), [])
    with pytest.raises(ValueError):
        ts.replay([0, 1], sent)


def test_real_detokenizer_streams_utf8_and_stops(ref):
    _, tok = ref
    text = "Café 🙂 crème brûlée, déjà vu! User: hi"
    ids = tok.encode(text, add_special_tokens=False)
    ts = TextStream(tok.detokenizer, ["User:"])
    out = []
    for i in ids:
        ts.add(i)
        t, stopped = ts.take()
        assert "\ufffd" not in t
        out.append(t)
        if stopped:
            break
    assert stopped and "".join(out) == "Café 🙂 crème brûlée, déjà vu! "
    # A fresh detokenizer each access: two streams do not share state.
    assert tok.detokenizer is not tok.detokenizer
