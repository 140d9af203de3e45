"""What the method selector knows of a request before it runs: features from its tokens alone.

Everything here is numpy over token ids (no model): a few hundred microseconds for a prompt of
thousands of tokens, computed by the router for every `auto` request and stored
with its performance record. Nothing reads a task label.

- `lookup_hit_rate`: prompt lookup run on the prompt itself. At each position the latest earlier
  occurrence of the preceding 3 (else 2) tokens proposes the next token; the share of positions
  where it was right. Prompts that repeat themselves (code, structured records) tend to get
  outputs that repeat them: a signal for `ngram` and `lookahead`.
- `repeat_3`: share of trigrams seen before in the prompt.
- `distinct`: distinct tokens over tokens.
- `code_share`: share of tokens whose text is code-like (brackets, operators, indentation).
- `rewrite_cue`: whether the prompt asks for its own material back, changed (rewrite, fix,
  convert, rename, quote, translate, ...): a word list, not a task label; outputs of such
  requests copy long runs of the prompt.
- `sketch`: a task signature, a MinHash of the prompt's token bigrams; requests of one kind of
  task share bigrams (their instruction, their format), so the online correction can tell a new
  family's requests apart without knowing its name.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SKETCH_DIM = 32
# The signature looks at the prompt's end: in a long prompt that leaves out a chat template's
# system prompt, which every request shares.
SIGNATURE_WINDOW = 256
_SEEDS = np.random.default_rng(20261130).integers(1, 2**63, size=SKETCH_DIM, dtype=np.uint64)
# Tokens looked at (the prompt's tail, where the output starts); the length itself is a feature.
WINDOW = 512
SHORT_PROMPT = 96  # `prompt_stats` loops in Python up to here
_CODE_CHARS = frozenset("{}()[];=<>+-*/%&|^!~:#\\`$@\"'")
_REWRITE_WORDS = frozenset((
    "rewrite", "rename", "refactor", "fix", "correct", "convert", "reformat", "format",
    "translate", "quote", "copy", "repeat", "edit", "modify", "change", "replace", "update",
    "extract", "return", "add", "remove", "delete", "insert", "list", "paraphrase", "proofread"))

# The order of the numeric features a predictor sees (`RequestFeatures.vector`).
REQUEST_FEATURES = ("log_prompt_tokens", "log_max_tokens", "temperature", "greedy", "top_p",
                    "lookup_hit_rate", "lookup_found_rate", "repeat_3", "distinct",
                    "code_share", "rewrite_cue")


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    prompt_tokens: int
    max_tokens: int
    temperature: float
    top_p: float
    lookup_hit_rate: float
    lookup_found_rate: float
    repeat_3: float
    distinct: float
    code_share: float
    rewrite_cue: float
    sketch: tuple[float, ...]

    def vector(self) -> list[float]:
        """The numeric features in `REQUEST_FEATURES` order."""
        return [math.log1p(self.prompt_tokens), math.log1p(self.max_tokens),
                min(self.temperature, 2.0), float(self.temperature == 0.0), self.top_p,
                self.lookup_hit_rate, self.lookup_found_rate, self.repeat_3, self.distinct,
                self.code_share, self.rewrite_cue]

    def as_dict(self) -> dict[str, float]:
        """Flat form for a `PerfRecord` (sketch as `sketch_0..`)."""
        out = dict(zip(REQUEST_FEATURES, self.vector(), strict=True))
        out.update(prompt_tokens=float(self.prompt_tokens), max_tokens=float(self.max_tokens))
        out.update({f"sketch_{i}": v for i, v in enumerate(self.sketch)})
        return out

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> RequestFeatures:
        """Inverse of `as_dict`; raises KeyError when a feature is missing (an older record)."""
        return cls(prompt_tokens=int(d["prompt_tokens"]), max_tokens=int(d["max_tokens"]),
                   temperature=d["temperature"], top_p=d["top_p"],
                   lookup_hit_rate=d["lookup_hit_rate"], lookup_found_rate=d["lookup_found_rate"],
                   repeat_3=d["repeat_3"], distinct=d["distinct"],
                   code_share=d["code_share"], rewrite_cue=d["rewrite_cue"],
                   sketch=tuple(d.get(f"sketch_{i}", 0.0) for i in range(SKETCH_DIM)))


def token_flags(vocab: Iterable[tuple[int, str]], size: int) -> np.ndarray:
    """Per token id, bit 1: its text is code-like; bit 2: it is a rewrite word. From (id, text)
    pairs, once per tokenizer."""
    mask = np.zeros(size, dtype=np.uint8)
    for tid, text in vocab:
        if not 0 <= tid < size:
            continue
        text = text.replace("Ġ", " ").replace("Ċ", "\n")
        if any(c in _CODE_CHARS for c in text) or text.startswith(("  ", "\t", "\n ")):
            mask[tid] |= 1
        if text.strip().lower() in _REWRITE_WORDS:
            mask[tid] |= 2
    return mask


def _gram_keys(t: np.ndarray, n: int, shorter: np.ndarray | None = None) -> np.ndarray:
    """Key of each n-gram of `t`, by start (exact: mixed in 64 bits); `shorter`: the keys of
    the (n-1)-grams, to extend instead of starting over."""
    u = t.astype(np.uint64)
    if shorter is None:
        key, first = u[:len(t) - n + 1].copy(), 1
    else:
        key, first = shorter[:len(t) - n + 1], n - 1
    for j in range(first, n):
        key = key * np.uint64(1_000_003) + u[j:len(t) - n + 1 + j]
    return key


def _previous_same(keys: np.ndarray) -> np.ndarray:
    """For each index, the latest earlier index with the same key, or -1."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    prev = np.full(len(keys), -1, dtype=np.int64)
    same = sk[1:] == sk[:-1]
    prev[order[1:][same]] = order[:-1][same]
    return prev


def tokenizer_flags(tokenizer: Any, vocab_size: int | None = None) -> np.ndarray:
    """`token_flags` of a Hugging Face tokenizer's vocabulary."""
    vocab = tokenizer.get_vocab()
    size = vocab_size or max(vocab.values()) + 1
    return token_flags(((i, t) for t, i in vocab.items()), size)


def prompt_stats(t: np.ndarray) -> tuple[float, float, float]:
    """(lookup hit rate, lookup found rate, repeat_3) of the tokens `t`.

    Prompt lookup run over the tokens themselves: at each position the latest earlier occurrence
    of the preceding trigram (else bigram) proposes the next token. `repeat_3` is the share of
    trigrams that occurred earlier. Up to `SHORT_PROMPT` tokens a loop over a dict is cheaper
    than numpy's twenty-odd array calls (35 against 95 us at 36 tokens; the two cross near 110),
    and gives the same three numbers.
    """
    n = len(t)
    if n < 3:
        return 0.0, 0.0, 0.0
    if n <= SHORT_PROMPT:
        return _short_prompt_stats(t.tolist())
    pred = np.full(n, -1, dtype=np.int64)  # proposed token at each position
    head, keys, repeat_3 = t[:-1], None, 0.0
    for size in (2, 3):  # the trigram's proposal overwrites the bigram's
        keys = _gram_keys(head, size, _gram_keys(head, 1) if keys is None else keys)
        prev = _previous_same(keys)  # the n-gram ending at i-1, i = index + size
        ok = prev >= 0
        pred[np.nonzero(ok)[0] + size] = t[prev[ok] + size]
        repeat_3 = float(ok.mean()) if len(ok) else 0.0
    found = pred >= 0
    hit = float((pred[found] == t[found]).sum()) / (n - 1)
    return hit, float(found.sum()) / (n - 1), repeat_3


def _short_prompt_stats(toks: list[int]) -> tuple[float, float, float]:
    """`prompt_stats` of at least 3 tokens, in plain Python."""
    n = len(toks)
    pred = [-1] * n
    repeat_3 = 0.0
    for size in (2, 3):  # as there: the trigram's proposal overwrites the bigram's
        latest: dict[tuple[int, ...], int] = {}
        repeats = 0
        for start in range(n - size):
            key = tuple(toks[start:start + size])
            prev = latest.get(key)
            if prev is not None:
                pred[start + size] = toks[prev + size]
                repeats += 1
            latest[key] = start
        repeat_3 = repeats / (n - size) if n > size else 0.0
    found = sum(p >= 0 for p in pred)
    hit = sum(p >= 0 and p == tok for p, tok in zip(pred, toks, strict=True))
    return hit / (n - 1), found / (n - 1), repeat_3


_SHIFT = np.uint64(31)
_MULTIPLIERS = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))
_LOW_32 = np.uint64(0xFFFFFFFF)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place: every input bit moves every output bit."""
    for mul in _MULTIPLIERS:
        h ^= h >> _SHIFT
        h *= mul
    h ^= h >> _SHIFT
    return h


def sketch(t: np.ndarray, dim: int = SKETCH_DIM) -> tuple[float, ...]:
    """A MinHash of the set of token bigrams in the last `SIGNATURE_WINDOW` tokens: `dim`
    32-bit values; the share of equal values between two sketches estimates the Jaccard
    similarity of their bigram sets (`signature_similarity`). All -1 for under two tokens."""
    if len(t) < 2:
        return (-1.0,) * dim
    return _min_hash(np.unique(_gram_keys(t[-SIGNATURE_WINDOW:], 2)), dim)


def _min_hash(keys: np.ndarray, dim: int) -> tuple[float, ...]:
    h = _mix(keys[:, None] ^ _SEEDS[None, :dim])
    return tuple((h.min(0) & _LOW_32).astype(np.float64).tolist())


def signature_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of sketch `b` with sketch `a` (or each row of `a`)."""
    return (a == b).mean(-1)


def request_features(tokens: Sequence[int], max_tokens: int, temperature: float, top_p: float,
                     flags_by_id: np.ndarray | None = None) -> RequestFeatures:
    """The features of one request (see the module doc)."""
    if len(tokens) <= SHORT_PROMPT:
        return _short_request_features(list(tokens), max_tokens, temperature, top_p, flags_by_id)
    t = np.asarray(tokens[-WINDOW:], dtype=np.int64)
    hit, found, repeat_3 = prompt_stats(t)
    n = max(len(t), 1)
    flags = (flags_by_id[t[t < len(flags_by_id)]] if flags_by_id is not None
             else np.zeros(0, np.uint8))
    code, cue = int((flags & 1).sum()), float(((flags & 2) > 0).any())
    return RequestFeatures(
        prompt_tokens=len(tokens), max_tokens=max_tokens, temperature=temperature, top_p=top_p,
        lookup_hit_rate=hit, lookup_found_rate=found, repeat_3=repeat_3,
        distinct=len(np.unique(t)) / n, code_share=code / n,
        rewrite_cue=cue, sketch=sketch(t))


def _short_request_features(toks: list[int], max_tokens: int, temperature: float, top_p: float,
                            flags_by_id: np.ndarray | None) -> RequestFeatures:
    """`request_features` of a prompt of at most `SHORT_PROMPT` tokens, the same numbers in
    plain Python where it beats numpy's calls. The router's code runs from cold caches between
    requests, and there each numpy call costs some 50 us: the numpy way took about 350 us for
    a 30-token prompt after 50 ms idle, this one about 150."""
    n = len(toks)
    hit, found, repeat_3 = _short_prompt_stats(toks) if n >= 3 else (0.0, 0.0, 0.0)
    code = cue = 0
    if flags_by_id is not None:
        size = len(flags_by_id)
        for flag in flags_by_id[[x for x in toks if 0 <= x < size]].tolist():
            code += flag & 1
            cue |= flag & 2
    if n < 2:
        signature = (-1.0,) * SKETCH_DIM
    else:  # the bigram keys of `_gram_keys` (exact below 2**64), distinct, in any order
        bigrams = {a * 1_000_003 + b for a, b in itertools.pairwise(toks)}
        signature = _min_hash(np.fromiter(bigrams, np.uint64, len(bigrams)), SKETCH_DIM)
    return RequestFeatures(
        prompt_tokens=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
        lookup_hit_rate=hit, lookup_found_rate=found, repeat_3=repeat_3,
        distinct=len(set(toks)) / max(n, 1), code_share=code / max(n, 1),
        rewrite_cue=float(cue > 0), sketch=signature)
