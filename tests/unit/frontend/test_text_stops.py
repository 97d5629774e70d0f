"""Stop strings found incrementally (issue 17): the same answer as a rescan of the whole text,
however the text is cut into pieces, in work linear in the text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitserve.frontend.text import stops as S
from bitserve.frontend.text.incremental import TextState


def ref_first_stop(text: str, stops: list[str]) -> int:
    """Brute force: where the first stop string to end in `text` starts (longest on a tie), or -1."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return end - max(len(s) for s in done)
    return -1


def ref_hold(text: str, stops: list[str]) -> int:
    """Brute force: the longest tail of `text` that is a proper prefix of some stop string."""
    return max(
        (k for s in stops for k in range(1, len(s)) if k <= len(text) and text.endswith(s[:k])), default=0
    )


alphabet = st.sampled_from("abc")  # few letters: overlaps, repeats and partial matches are common
texts = st.text(alphabet, max_size=40)
stop_lists = st.lists(st.text(alphabet, min_size=1, max_size=6), min_size=1, max_size=4)


def pieces_of(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=400, deadline=None)
@given(text=texts, stops=stop_lists, cuts=st.lists(st.integers(0, 100), max_size=12))
def test_matcher_agrees_with_a_rescan_however_the_text_is_cut(text, stops, cuts):
    m = S.StopStrings(stops).matcher()
    seen, found = "", -1
    for piece in pieces_of(text, cuts):
        at = m.feed(piece)
        if at is not None:
            found = len(seen) + at
            break
        seen += piece
        assert m.hold == ref_hold(seen, stops), (seen, stops)
    assert found == ref_first_stop(text, stops)
    assert S.find_stop(text, stops) == ref_first_stop(text, stops)


class CharDecoder:
    """Token id = a character's code point; every token decodes at once."""

    def step(self, token: int) -> str:
        return chr(token)

    def flush(self) -> str:
        return ""


@settings(max_examples=200, deadline=None)
@given(text=texts, stops=stop_lists)
def test_streamed_pieces_are_the_final_text_cut_before_the_stop(text, stops):
    state = TextState(CharDecoder, stops)
    streamed = ""
    for ch in text:
        state.add(ord(ch))
        streamed += state.take()
        assert len(streamed) <= len(state.text)
        if state.stopped:
            break
    final = state.finish()
    streamed += state.take()
    first = ref_first_stop(text, stops)
    assert final == (text if first < 0 else text[:first]) == streamed
    assert state.stopped == (first >= 0)


def test_work_per_character_does_not_grow_with_the_stop_strings_length():
    """Main's `stop_hold` compared every tail of the text with every prefix of each stop: text
    length x stop length per token. Counted in comparisons of the KMP loop (amortized at most 2
    per character and stop string: each step forward can be undone at most once)."""
    calls = {"n": 0}

    class Counting(list):
        def __getitem__(self, k):
            calls["n"] += 1
            return list.__getitem__(self, k)

    for length in (40, 4000):
        # The text keeps matching a long prefix of every stop, then breaks it with a character
        # the stops contain (so the mismatch walks the failure chain, not the fast path).
        stops = ["a" * (length - 1) + "b" for _ in range(16)]
        compiled = S.StopStrings(stops)
        compiled.fail = tuple(Counting(f) for f in compiled.fail)  # type: ignore[assignment]
        m = compiled.matcher()
        calls["n"] = 0
        text = ("a" * (length // 2) + "b") * 4
        for ch in text:
            assert m.feed(ch) is None
        # Each failure-table read undoes one earlier step forward, of the matcher or of the
        # table's own (lazy) construction: at most two per character and stop string, whatever
        # the stops' length (main: ~length per character).
        assert 0 < calls["n"] <= 2 * 16 * len(text), (length, calls["n"])


@pytest.mark.parametrize("stops", [["ab"], ["b", "ab"], ["abc", "bc"]])
def test_of_two_stops_ending_together_the_longer_cuts_first(stops):
    assert S.find_stop("xxabcd", stops) == 2
