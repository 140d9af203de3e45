"""Prompt lookup (`ngram`): drafts copied from what followed the latest earlier occurrence of the
request's last n tokens, in its prompt or its output so far (n from `max_n` down to `min_n`)."""

from __future__ import annotations

from array import array

from baton.actors.draft_tree import DraftTree

_ITEM = array("i").itemsize


def propose_ngram(tokens: list[int], k: int, min_n: int = 1, max_n: int = 4) -> DraftTree | None:
    """Up to `k` tokens following the most recent earlier match of the last n tokens."""
    if k < 1 or len(tokens) < 2:
        return None
    hay = array("i", tokens).tobytes()
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        needle = hay[-n * _ITEM :]
        end = len(hay) - _ITEM  # the match must end before the last token
        while True:
            at = hay.rfind(needle, 0, end)
            if at < 0:
                break
            if at % _ITEM == 0:  # aligned on a token, not inside one
                start = at // _ITEM + n
                follow = tokens[start : start + k]
                if follow:
                    return DraftTree.chain(follow)
                break
            end = at + len(needle) - 1
    return None
