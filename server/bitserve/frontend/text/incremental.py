"""The text of one generation as its tokens arrive: what may be streamed, where a stop string
ends it, and the final text. Runs in the front, on the event loop: each token costs time in its
own piece of text and the number of stop strings, never in the text's or the stops' length."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from bitserve.frontend.text.stops import StopStrings


class TextState:
    __slots__ = ("decoder", "stops", "text", "released", "sent", "stopped")

    def __init__(self, new_decoder: Callable[[], Any], stops: Sequence[str] | StopStrings = ()):
        self.decoder = new_decoder()
        # Compiled stop strings are shared by a request's texts (compiling is linear in their length).
        compiled = stops if isinstance(stops, StopStrings) else StopStrings(stops)
        self.stops = compiled.matcher() if len(compiled) else None
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
        start = len(self.text)
        self.text += piece
        if self.stops is None:
            self.released = len(self.text)
            return
        at = self.stops.feed(piece)
        if at is not None:
            self.text = self.text[: start + at]
            self.stopped = True
            self.released = len(self.text)
            return
        self.released = len(self.text) - self.stops.hold

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
