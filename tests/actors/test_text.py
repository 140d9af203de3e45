"""Incremental detokenization and sampling filters, without a model."""

from __future__ import annotations

import pytest
import torch

from baton.actors import detokenizer
from baton.actors.detokenizer import IncrementalDetokenizer
from baton.actors.model_source import load_tokenizer, resolve
from baton.actors.sampler import _filter_top_k_top_p, sample
from baton.actors.tiny import tiny_tokenizer
from baton.sampling import SamplingParams

TEXT = "héllo 世界 🎉! Don't stop,  ok?\n\tdone"


class PythonOnlyTokenizer:
    """Fake: a tokenizer without a Rust backend (decodes through the tiny tokenizer)."""

    def __init__(self) -> None:
        self._tok = tiny_tokenizer()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class RefusingDecodeStream:
    """Fake: a Rust decoder that refuses every step (as on a decode that rewrote its prefix)."""

    def __init__(self, ids: list[int], skip_special_tokens: bool) -> None:
        pass

    def step(self, tokenizer: object, token_id: int) -> str | None:
        raise Exception("Invalid prefix encountered")  # what tokenizers raises


@pytest.fixture(params=["rust", "python", "refused"])
def decoding(request, monkeypatch):
    """Every way a token's text is decoded: `DecodeStream`, the Python window, and the Python
    window taking over from a `DecodeStream` that refused a step."""
    if request.param == "refused":
        monkeypatch.setattr(detokenizer, "DecodeStream", RefusingDecodeStream)
    return request.param


def _feed(text: str, stop: list[str] | None = None, finish: bool = True, decoding: str = "rust",
          prompt: str | list[int] = "prompt", first: list[int] | None = None):
    """Stream `text` (after the tokens `first`) as one request's output; (deltas, detok,
    stopped)."""
    # Byte-level: a multi-byte character spans several tokens.
    tok = PythonOnlyTokenizer() if decoding == "python" else tiny_tokenizer()
    prompt_ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
    detok = IncrementalDetokenizer(tok, prompt_ids, stop or [])
    deltas, stopped = [], False
    for t in [*(first or []), *tok.encode(text)]:
        stopped = detok.add(t)
        deltas.append(detok.delta(False))
        if stopped:
            break
    if finish:
        detok.flush()
        deltas.append(detok.delta(True))
    return deltas, detok, stopped


def test_multibyte_characters_are_released_whole(decoding):
    text = "héllo 世界 🎉!"
    deltas, detok, _ = _feed(text, decoding=decoding)
    assert "".join(deltas) == text == detok.text
    assert all("\ufffd" not in d for d in deltas)
    assert "🎉" in deltas  # the 4-byte emoji came out in one piece, after its last byte


def test_stop_string_is_cut_and_never_streamed(decoding):
    deltas, detok, stopped = _feed("one two STOP three", stop=["STOP"], finish=False,
                                   decoding=decoding)
    assert stopped
    assert detok.text == "one two "
    streamed = "".join(deltas)
    assert "S" not in streamed and detok.text.startswith(streamed)


def test_text_that_only_starts_a_stop_string_is_released_at_the_end(decoding):
    deltas, detok, stopped = _feed("a STO", stop=["STOP"], decoding=decoding)
    assert not stopped and "".join(deltas) == "a STO"


def _bytes(text: str) -> list[int]:
    return list(text.encode())  # the tiny tokenizer's token id of a byte is the byte


def test_an_unfinished_character_is_released_at_the_end_without_its_missing_bytes(decoding):
    tok = PythonOnlyTokenizer() if decoding == "python" else tiny_tokenizer()
    detok = IncrementalDetokenizer(tok, _bytes("prompt"), [])
    for t in _bytes("ok 世")[:-1]:  # the output stops one byte short of its last character
        detok.add(t)
    assert detok.delta(False) == "ok "
    detok.flush()
    assert detok.delta(True) == "" and detok.text == "ok "  # no replacement mark shows


def test_a_prompt_that_ends_mid_character_keeps_its_text_out_of_the_output(decoding):
    # The prompt ends with two of 世's three bytes, the output starts with the third: the
    # character is the prompt's, and no text of the prompt is streamed as output.
    prompt = _bytes("ab世")[:-1]
    deltas, detok, _ = _feed("cd", decoding=decoding, prompt=prompt, first=_bytes("世")[-1:])
    assert "".join(deltas) == detok.text == "cd"


def test_the_default_models_tokenizer_streams_exactly_its_one_shot_decode():
    tok = load_tokenizer(resolve("default"))  # byte-level BPE (SmolLM2)
    prompt = tok.encode("Say something:")
    out = tok.encode(TEXT, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt, [])
    assert detok._stream is not None  # decoded in Rust
    deltas = []
    for t in out:
        detok.add(t)
        deltas.append(detok.delta(False))
    detok.flush()
    deltas.append(detok.delta(True))
    assert "".join(deltas) == tok.decode(out, skip_special_tokens=True) == TEXT
    assert all("\ufffd" not in d for d in deltas)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    out = _filter_top_k_top_p(logits, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.7, 0.85]))
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [True, True, False, False]  # top-2
    assert kept[1].tolist() == [True, True, False, False]  # 0.5 + 0.3 reaches 0.7
    assert kept[2].tolist() == [True, True, True, False]  # needs 0.15 too to reach 0.85


def test_seeded_rows_do_not_depend_on_their_neighbours():
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, seed=1)
    a, _ = sample(logits, [p, p, p], [torch.Generator().manual_seed(9) for _ in range(3)])
    b, _ = sample(logits[1:2], [p], [torch.Generator().manual_seed(9)])
    assert a[1] == b[0]
