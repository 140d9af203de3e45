"""Incremental detokenization and stop strings for streaming.

Text is released only once it decodes to whole characters (a multi-byte character split across
tokens is held back until complete), and the last `len(longest stop) - 1` characters are held
until they can no longer start a stop string, so a stream never shows text that is later cut.

Each token is decoded in Rust (`tokenizers.decoders.DecodeStream`) where that gives the same text
as decoding the window in Python; elsewhere (tokenizers without a Rust backend, a prompt that ends
mid-character, a step the Rust decoder refuses) the window is decoded in Python, twice a token.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5  # prompt tokens decoded with the output so leading spaces come out right


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas; owns its stop-string check."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        # The window: the tokens of the last released text (or the prompt's tail), then those
        # not yet released. `DecodeStream` keeps the same window on the Rust side.
        self._prefix_ids = context
        self._pending: list[int] = []
        self._backend: Tokenizer | None = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = self._rust_stream(context)
        self.text = ""
        self.emitted = 0
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.stopped = False
        self._search_from = 0

    def _rust_stream(self, context: list[int]) -> DecodeStream | None:
        """A `DecodeStream` over `context`, where it gives the text the Python window gives."""
        if self._backend is None or getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            return None  # no Rust backend, or transformers rewrites spaces after the Rust decode
        if self._decode(context).endswith(REPLACEMENT):
            # The prompt ends mid-character: `DecodeStream` would release the prompt's text
            # with the character once an output token completes it.
            return None
        return DecodeStream(ids=context, skip_special_tokens=True)

    def add(self, token_id: int) -> bool:
        """Append a token; True when a stop string completed (the text is cut before it)."""
        self._pending.append(token_id)
        chunk = self._next_chunk(token_id)
        if chunk is not None:
            self.text += chunk
            self._prefix_ids, self._pending = self._pending, []
        return self._check_stop()

    def _next_chunk(self, token_id: int) -> str | None:
        """The text `token_id` completes, or None while the window ends mid-character."""
        if self._stream is not None and self._backend is not None:
            try:
                return self._stream.step(self._backend, token_id)
            except Exception:  # noqa: BLE001 - a decode that changed the text already released
                self._stream = None  # this request goes on in Python, which takes the new text
        new = self._window_text()
        return new if new and not new.endswith(REPLACEMENT) else None

    def _window_text(self) -> str:
        """What the pending tokens add to the text of the window's released part."""
        prefix = self._decode(self._prefix_ids)
        return self._decode(self._prefix_ids + self._pending)[len(prefix):]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

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
        if self.stopped or not self._pending:
            return
        tail = self._window_text().replace(REPLACEMENT, "")
        if tail:
            self.text += tail
            self._prefix_ids, self._pending = self._pending, []
            self._check_stop()

    def delta(self, finished: bool) -> str:
        """Text not yet emitted; while running, minus the part that may still start a stop."""
        upto = len(self.text) if finished else max(len(self.text) - self.hold, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out
