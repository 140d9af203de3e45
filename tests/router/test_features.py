"""The selector's request features: deterministic, fast to compute, and saying what they claim."""

from __future__ import annotations

import random

import numpy as np

from baton.router import features
from baton.router.features import (
    REQUEST_FEATURES,
    RequestFeatures,
    prompt_stats,
    request_features,
    signature_similarity,
    sketch,
    token_flags,
)


def test_prompt_lookup_rate_sees_a_prompt_that_repeats_itself():
    rng = random.Random(0)
    fresh = np.array([rng.randrange(50_000) for _ in range(300)])
    looped = np.array(list(range(40)) * 8)
    hit, found, r3 = prompt_stats(fresh)
    assert hit < 0.02 and r3 == 0
    hit, found, r3 = prompt_stats(looped)
    # After the first pass every next token is the one lookup proposes.
    assert hit > 0.85 and found > 0.85 and r3 > 0.85


def test_lookup_proposes_from_the_latest_occurrence_of_the_longest_ngram():
    # "1 2 3" was followed by 4 and later by 9; at the end "1 2 3" proposes 9 (latest), right.
    t = np.array([1, 2, 3, 4, 7, 1, 2, 3, 9, 5, 1, 2, 3, 9])
    hit, found, _ = prompt_stats(t)
    hit_wrong, _, _ = prompt_stats(np.array([1, 2, 3, 4, 7, 1, 2, 3, 9, 5, 1, 2, 3, 4]))
    assert hit > hit_wrong  # only the last token differs


def test_code_share_and_rewrite_cue_come_from_the_token_texts():
    vocab = [(0, "def"), (1, "Ġfoo"), (2, "("), (3, "):"), (4, "Ġreturn"), (5, "Ġhello"),
             (6, "ĠRewrite"), (7, "Ġthe")]
    flags = token_flags(vocab, 8)
    code = request_features([0, 1, 2, 3, 4], 16, 0.0, 1.0, flags)
    prose = request_features([5, 7, 5, 7, 1], 16, 0.0, 1.0, flags)
    ask = request_features([6, 7, 5], 16, 0.0, 1.0, flags)
    assert code.code_share == 2 / 5 and prose.code_share == 0
    assert code.rewrite_cue == 1.0 and prose.rewrite_cue == 0.0 and ask.rewrite_cue == 1.0


def test_features_are_deterministic_and_survive_a_record():
    rng = random.Random(1)
    ids = [rng.randrange(1000) for _ in range(700)]
    a = request_features(ids, 128, 0.7, 0.9)
    b = request_features(list(ids), 128, 0.7, 0.9)
    assert a == b
    assert RequestFeatures.from_dict(a.as_dict()) == a
    assert len(a.vector()) == len(REQUEST_FEATURES)
    assert a.prompt_tokens == 700 and a.temperature == 0.7 and a.vector()[3] == 0.0  # sampled


def test_sketch_puts_one_task_family_together():
    rng = random.Random(2)
    vocab_a, vocab_b = range(0, 300), range(5000, 5300)
    template = [rng.choice(vocab_a) for _ in range(60)]
    a1 = template + [rng.choice(vocab_a) for _ in range(20)]
    a2 = template + [rng.choice(vocab_a) for _ in range(20)]
    b = [rng.choice(vocab_b) for _ in range(80)]
    sa1, sa2, sb = (np.array(sketch(np.array(x))) for x in (a1, a2, b))
    # 59 of the 79 bigrams are shared within the family (Jaccard ~0.6), none across.
    assert signature_similarity(sa1, sa2) > 0.4
    assert signature_similarity(sa1, sb) == 0.0
    assert signature_similarity(np.stack([sa2, sb]), sa1).tolist() == [
        signature_similarity(sa2, sa1), 0.0]


def test_empty_and_one_token_prompts_have_features():
    for ids in ([], [7]):
        f = request_features(ids, 8, 0.0, 1.0)
        assert f.lookup_hit_rate == 0 and f.repeat_3 == 0
        assert all(np.isfinite(f.vector()))


def test_short_and_long_prompts_get_the_same_lookup_statistics_either_way(monkeypatch):
    # Up to SHORT_PROMPT tokens the statistics come from a Python loop, past it from numpy:
    # both give the same three numbers on the same tokens, repetitive or not.
    rng = random.Random(5)
    cases = [np.array([rng.randrange(alphabet) for _ in range(n)])
             for n in (*range(0, 24), 95, 96, 97, 200) for alphabet in (2, 7, 50_000)]
    short = [prompt_stats(t) for t in cases]
    monkeypatch.setattr(features, "SHORT_PROMPT", -1)  # numpy for every length
    assert [prompt_stats(t) for t in cases] == short
    assert any(hit > 0 for hit, _, _ in short) and any(r3 > 0 for _, _, r3 in short)


def test_short_prompts_get_the_features_numpy_gives_them(monkeypatch):
    # Up to SHORT_PROMPT tokens every feature comes from plain Python; numpy's own path must
    # give the same record (the selector's model and history were made of it).
    rng = random.Random(6)
    vocab = [(i, rng.choice(["Ġthe", "(", "Ġrewrite", "Ġx", "):", "Ġcat"])) for i in range(400)]
    flags = token_flags(vocab, 400)
    cases = [[rng.randrange(alphabet) for _ in range(n)]
             for n in (0, 1, 2, 3, 5, 17, 60, 95, 96) for alphabet in (3, 40, 400)]
    short = [request_features(ids, 32, 0.0, 1.0, flags) for ids in cases]
    monkeypatch.setattr(features, "SHORT_PROMPT", -1)  # numpy for every length
    assert [request_features(ids, 32, 0.0, 1.0, flags) for ids in cases] == short
    assert any(f.code_share > 0 for f in short) and any(f.rewrite_cue for f in short)
    assert len({f.sketch for f in short}) > len(cases) // 2
