"""Incremental detokenization and stop strings for streaming.

Text is released only once it decodes to whole characters (a multi-byte character split across
tokens is held back until complete), and the last `len(longest stop) - 1` characters are held
until they can no longer start a stop string, so a stream never shows text that is later cut.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5  # prompt tokens decoded with the output so leading spaces come out right


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas; owns its stop-string check."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.emitted = 0
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.stopped = False
        self._search_from = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> bool:
        """Append a token; True when a stop string completed (the text is cut before it)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._check_stop()

    def _check_stop(self) -> bool:
        if not self.stop:
            return False
        start = max(self._search_from - self.hold, 0)
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        self._search_from = len(self.text)
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped

    def flush(self) -> None:
        """At the end, release whatever complete characters were waiting for more bytes."""
        if self.stopped or self.read_offset >= len(self.ids):
            return
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        tail = self._decode(self.ids[self.prefix_offset :])[len(prefix) :].replace(REPLACEMENT, "")
        if tail:
            self.text += tail
            self.read_offset = len(self.ids)
            self._check_stop()

    def delta(self, finished: bool) -> str:
        """Text not yet emitted; while running, minus the part that may still start a stop."""
        upto = len(self.text) if finished else max(len(self.text) - self.hold, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out
