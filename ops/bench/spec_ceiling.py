"""How far prompt lookup could go on a request's own text: the bound `bench spec` sets beside the
lookup methods' measured tokens per decode pass.

At every decode step the oracle knows which earlier occurrence of the context's last n tokens
(n up to `max_n`, in the prompt or the output so far) is followed by the most of the tokens the
model goes on to write, and drafts that continuation (up to `k` tokens); the pass gains those
tokens and the one the model writes after them. No lookup draft of `k` tokens from the same text
gains more in a pass, so a method far below it drafts from the wrong occurrences, and a method
near it on a family that still misses a speed target is held back by the text (the model writes
what its prompt and output do not hold), not by the method. `lookahead` can pass it: its shared
trie also drafts from other requests' outputs.
"""

from __future__ import annotations

from collections import defaultdict


def lookup_oracle_passes(prompt: list[int], output: list[int], max_n: int = 4,
                         k: int = 8) -> int:
    """Decode passes that writing `output[1:]` takes (the first output token comes from the
    prefill) when every pass drafts the best lookup continuation of at most `k` tokens."""
    if max_n < 1 or k < 0:
        raise ValueError(f"need max_n >= 1 and k >= 0, got {max_n} and {k}")
    ctx: list[int] = []
    # n-gram -> the positions just after each of its occurrences in `ctx`
    follows: dict[tuple[int, ...], list[int]] = defaultdict(list)

    def extend(tokens: list[int]) -> None:
        for tok in tokens:
            ctx.append(tok)
            end = len(ctx)
            for n in range(1, min(max_n, end) + 1):
                follows[tuple(ctx[end - n:end])].append(end)

    extend(prompt)
    extend(output[:1])
    i, passes = 1, 0
    while i < len(output):
        best = 0
        for n in range(1, min(max_n, len(ctx)) + 1):
            for start in follows.get(tuple(ctx[-n:]), ()):
                length = 0
                while (length < k and i + length < len(output) and start + length < len(ctx)
                       and ctx[start + length] == output[i + length]):
                    length += 1
                best = max(best, length)
        gained = min(best + 1, len(output) - i)
        extend(output[i:i + gained])
        i += gained
        passes += 1
    return passes
