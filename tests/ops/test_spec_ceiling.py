"""The prompt-lookup oracle that `bench spec` sets beside the lookup methods."""

from __future__ import annotations

import math

import pytest

from baton.actors.ngram import propose_ngram
from baton.ops.bench.spec_ceiling import lookup_oracle_passes


@pytest.mark.parametrize("k", [1, 4, 8])
def test_a_copied_span_takes_one_pass_per_draft_and_the_token_after_it(k: int) -> None:
    prompt = list(range(100, 140))
    output = prompt[10:30]  # the first from the prefill, 19 to decode
    assert lookup_oracle_passes(prompt, output, k=k) == math.ceil(19 / (k + 1))


def test_text_found_nowhere_earlier_takes_a_pass_a_token() -> None:
    prompt = list(range(100, 140))
    output = list(range(500, 520))
    assert lookup_oracle_passes(prompt, output) == 19
    assert lookup_oracle_passes(prompt, output[:1]) == 0  # nothing left to decode


def test_the_oracle_drafts_from_the_best_occurrence_not_the_latest() -> None:
    """The latest earlier `5 6` is followed by 99, which prompt lookup drafts; the oracle takes
    the earlier one, followed by what the model writes."""
    prompt = [1, 5, 6, 7, 8, 9, 2, 5, 6, 99, 3, 5]
    output = [6, 7, 8, 9, 4]
    assert lookup_oracle_passes(prompt, output, max_n=2) == 1
    latest = propose_ngram(prompt + output[:1], k=4, max_n=2)
    assert latest is not None and latest.tokens[0] == 99


def test_the_output_itself_is_looked_up_too() -> None:
    output = [7, 8, 9, 10, 7, 8, 9, 10, 7, 8, 9, 10]
    # 8, 9, 10 and the second 7 a pass each (nothing earlier to copy); then 8 9 10 7, copied
    # from the output so far, and the 8 after it; then 9 10 the same way.
    assert lookup_oracle_passes([1, 2, 3], output, k=8) == 6


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="max_n >= 1"):
        lookup_oracle_passes([1], [2], max_n=0)
