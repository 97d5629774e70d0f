"""Stop strings, found in the detokenized text as it grows, in time linear in the text.

`StopStrings` compiles a request's stop strings once (a KMP failure table each: time and memory
linear in their characters, paid off the event loop). `StopMatcher` follows one text: for every
stop string, how long a prefix of it the text currently ends with. Each new piece of text moves
those states forward (amortized O(1) per character and stop string), so a token costs the same
whether the text is 10 or 10,000 characters long and whatever the stop strings' length; no call
ever rescans the text.
"""

from __future__ import annotations

from collections.abc import Sequence


def _failure(s: str) -> list[int]:
    """KMP: fail[k] = length of the longest proper prefix of s[:k+1] that is also its suffix."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        c = s[i]
        while k and s[k] != c:
            k = fail[k - 1]
        if s[k] == c:
            k += 1
        fail[i] = k
    return fail


class StopStrings:
    """One request's stop strings, compiled (immutable; shared by all of its texts)."""

    __slots__ = ("stops", "fail", "chars")

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.fail = tuple(_failure(s) for s in self.stops)
        self.chars = tuple(frozenset(s) for s in self.stops)

    def __len__(self) -> int:
        return len(self.stops)

    def matcher(self) -> StopMatcher:
        return StopMatcher(self)


class StopMatcher:
    """Where one growing text stands against each stop string."""

    __slots__ = ("c", "state")

    def __init__(self, compiled: StopStrings):
        self.c = compiled
        self.state = [0] * len(compiled.stops)  # matched prefix length, per stop string

    @property
    def hold(self) -> int:
        """Length of the longest tail of the text so far that could still grow into a stop."""
        return max(self.state, default=0)

    def feed(self, piece: str) -> int | None:
        """Advance over `piece` (the text's next characters). If a stop string now ends in it,
        returns where that stop string starts, as an offset from the start of `piece` (negative
        when it began in earlier text); else None. The first stop string to end wins; of several
        ending at the same character, the longest."""
        c = self.c
        best_end, best_len = len(piece), 0
        state = self.state
        for i, s in enumerate(c.stops):
            m = state[i]
            if m == 0 and s[0] not in piece:
                continue  # cannot start in this piece (a C-speed check for the common case)
            fail, chars, n = c.fail[i], c.chars[i], len(s)
            for j, ch in enumerate(piece):
                if j > best_end:
                    break  # another stop string ends earlier
                if ch not in chars:
                    m = 0
                    continue
                while m and s[m] != ch:
                    m = fail[m - 1]
                if s[m] == ch:
                    m += 1
                    if m == n:
                        if j < best_end or n > best_len:
                            best_end, best_len = j, n
                        m = fail[m - 1]
                        break
            state[i] = m
        return best_end + 1 - best_len if best_len else None


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index in `text` where the first stop string to be completed starts, or -1 (the whole
    text as one piece: what `StopMatcher` gives however the text is cut into pieces)."""
    if not stops:
        return -1
    at = StopStrings(stops).matcher().feed(text)
    return -1 if at is None else at
