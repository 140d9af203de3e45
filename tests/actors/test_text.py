"""Incremental detokenization and sampling filters, without a model."""

from __future__ import annotations

import torch

from baton.actors.detokenizer import IncrementalDetokenizer
from baton.actors.sampler import _filter_top_k_top_p, sample
from baton.actors.tiny import tiny_tokenizer
from baton.sampling import SamplingParams


def _feed(text: str, stop: list[str] | None = None, finish: bool = True):
    tok = tiny_tokenizer()  # byte-level: a multi-byte character spans several tokens
    detok = IncrementalDetokenizer(tok, tok.encode("prompt"), stop or [])
    deltas, stopped = [], False
    for t in tok.encode(text):
        stopped = detok.add(t)
        deltas.append(detok.delta(False))
        if stopped:
            break
    if finish:
        detok.flush()
        deltas.append(detok.delta(True))
    return deltas, detok, stopped


def test_multibyte_characters_are_released_whole():
    text = "héllo 世界 🎉!"
    deltas, detok, _ = _feed(text)
    assert "".join(deltas) == text == detok.text
    assert all("\ufffd" not in d for d in deltas)
    assert "🎉" in deltas  # the 4-byte emoji came out in one piece, after its last byte


def test_stop_string_is_cut_and_never_streamed():
    deltas, detok, stopped = _feed("one two STOP three", stop=["STOP"], finish=False)
    assert stopped
    assert detok.text == "one two "
    streamed = "".join(deltas)
    assert "S" not in streamed and detok.text.startswith(streamed)


def test_text_that_only_starts_a_stop_string_is_released_at_the_end():
    deltas, detok, stopped = _feed("a STO", stop=["STOP"])
    assert not stopped and "".join(deltas) == "a STO"


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
