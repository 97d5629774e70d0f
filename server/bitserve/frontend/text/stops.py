"""Stop strings, found in the detokenized text as it grows, in time linear in the text.

`StopStrings` holds a request's stop strings with a KMP failure table each, built lazily: only
as far as some text has matched (a stop string of 4,000 characters that the text never gets far
into costs a few entries, and each entry is built once). `StopMatcher` follows one text: for
every stop string, how long a prefix of it the text currently ends with. Each new piece of text
moves those states forward (amortized O(1) per character and stop string, table building
included), so a token costs the same whether the text is 10 or 10,000 characters long and
whatever the stop strings' length; no call ever rescans the text.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    """One request's stop strings (shared by all of its texts, on one thread)."""

    __slots__ = ("stops", "fail", "chars", "_k")

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        # KMP: fail[i][j] = length of the longest proper prefix of stops[i][:j+1] that is also
        # its suffix; grown on demand (`_grow`), `_k` is where its computation stands.
        self.fail: tuple[list[int], ...] = tuple([0] for _ in self.stops)
        self._k = [0] * len(self.stops)
        self.chars = tuple(frozenset(s) for s in self.stops)

    def _grow(self, i: int, n: int) -> None:
        """Extend stop i's failure table to n entries (the standard prefix function, resumed)."""
        s, fail, k = self.stops[i], self.fail[i], self._k[i]
        for j in range(len(fail), n):
            c = s[j]
            while k and s[k] != c:
                k = fail[k - 1]
            if s[k] == c:
                k += 1
            fail.append(k)
        self._k[i] = k

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
                        break  # the text ends here: no state is needed after it
                    if m > len(fail):
                        c._grow(i, m)
            state[i] = m
        return best_end + 1 - best_len if best_len else None


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index in `text` where the first stop string to be completed starts, or -1 (the whole
    text as one piece: what `StopMatcher` gives however the text is cut into pieces)."""
    if not stops:
        return -1
    at = StopStrings(stops).matcher().feed(text)
    return -1 if at is None else at
