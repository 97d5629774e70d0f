"""The text of one generation as its tokens arrive: what may be streamed, where a stop string
ends it, and the final text. Runs in the front, on the event loop (cheap per token)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from bitserve.frontend.text.stops import find_stop, stop_hold


class TextState:
    __slots__ = ("decoder", "stops", "stop_max", "text", "released", "sent", "stopped")

    def __init__(self, new_decoder: Callable[[], Any], stops: Sequence[str] = ()):
        self.decoder = new_decoder()
        self.stops = tuple(stops)
        self.stop_max = max((len(s) for s in self.stops), default=0)
        self.text = ""  # decoded so far, cut at the first stop string
        self.released = 0  # characters of `text` that can no longer change (streamable)
        self.sent = 0  # characters handed out by `take`
        self.stopped = False  # a stop string was found

    def add(self, token_id: int) -> None:
        if self.stopped:
            return
        piece = self.decoder.step(token_id)
        if not piece:
            return
        start = max(0, len(self.text) - self.stop_max + 1)
        self.text += piece
        if self.stops:
            cut = find_stop(self.text, self.stops, start)
            if cut >= 0:
                self.text = self.text[:cut]
                self.stopped = True
                self.released = len(self.text)
                return
            self.released = len(self.text) - stop_hold(self.text, self.stops)
        else:
            self.released = len(self.text)

    def finish(self) -> str:
        """The final text: the decoder's held-back tail included (no stop string can follow)."""
        if not self.stopped:
            self.text += self.decoder.flush()
        self.released = len(self.text)
        return self.text

    def take(self) -> str:
        """Text released since the last call; all calls together give the final text."""
        piece = self.text[self.sent : self.released]
        self.sent = self.released
        return piece
