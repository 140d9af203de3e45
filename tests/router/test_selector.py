"""The method selector on a synthetic world (`selector_world.py`): it generalizes to a family it
never saw, adapts to one its prior gets wrong, explores within its budget, and never picks a lossy
candidate a request did not allow."""

from __future__ import annotations

import random

import numpy as np
import pytest

from baton.router import selector
from baton.router.selector import MethodSelector
from baton.router.selector_training import NotEnoughHistory, train
from baton.router.speed_model import Candidate, SpeedModel, TrainingSettings
from tests.router import selector_world as world

NONE, NGRAM = Candidate("none"), Candidate("ngram")
FAST = TrainingSettings(members=3, steps=300)


@pytest.fixture(scope="module")
def prior() -> SpeedModel:
    """Trained on families 0-2 only."""
    return train(world.records([0, 1, 2], 24, ["none", "ngram"]), FAST)


def test_zero_shot_on_a_family_never_seen(prior):
    sel = MethodSelector(prior, explore_rate=0.0)
    rng = random.Random(5)
    right = 0
    for i in range(40):  # family 7: new tokens, new signature
        f = world.features(7, 0.9 * (i % 10) / 9, rng)
        pick = sel.choose(f, [NONE, NGRAM]).candidate.method
        best = max(("none", "ngram"), key=lambda m: world.speed(m, f))
        close = world.speed(pick, f) >= 0.95 * world.speed(best, f)
        right += close
    assert right >= 36


def test_predictions_survive_serialization(prior):
    again = SpeedModel.from_bytes(prior.to_bytes())
    x = np.random.default_rng(0).normal(size=(5, prior.n_inputs)).astype(np.float32)
    assert np.allclose(prior.predict(x), again.predict(x))
    assert again.pools == prior.pools and again.info.records == prior.info.records
    with pytest.raises(ValueError, match="not a Baton speed model"):
        SpeedModel.from_bytes(b"not a model")


def test_training_needs_enough_records():
    with pytest.raises(NotEnoughHistory, match="training needs 32"):
        train(world.records([0], 3, ["none", "ngram"]))


def test_a_family_the_prior_gets_wrong_is_learned_within_a_few_requests(prior):
    # In family 9, prompt lookup pays even on prompts that do not repeat (their outputs copy
    # from them): the prior, which learned that lookup needs repetition, says none.
    def truth(method: str) -> float:
        return world.BASE_TPS * (1.8 if method == "ngram" else 1.0)

    rng = random.Random(9)
    fresh = MethodSelector(prior, explore_rate=0.0)
    first = [fresh.choose(world.features(9, 0.0, rng), [NONE, NGRAM]).candidate.method
             for _ in range(10)]
    assert first.count("none") >= 7  # what the prior says of the family
    sel = MethodSelector(prior, explore_rate=0.25, seed=3)
    picks = []
    for _ in range(60):
        f = world.features(9, 0.0, rng)
        choice = sel.choose(f, [NONE, NGRAM])
        sel.observe(choice, truth(choice.candidate.method))
        picks.append(choice.candidate.method)
    assert picks[-15:].count("ngram") >= 10  # the rest: explorations, within the 25%
    # Its best guess for the family is now ngram ...
    for _ in range(5):
        f = world.features(9, 0.0, rng)
        assert sel.choose(f, [NONE, NGRAM], explore=False).candidate.method == "ngram"
    # ... and only for that family: a plain prompt of a known family still gets none.
    plain = world.features(1, 0.0, rng)
    assert sel.choose(plain, [NONE, NGRAM], explore=False).candidate.method == "none"


def test_exploration_stays_within_its_budget_and_obeys_the_request():
    sel = MethodSelector(None, explore_rate=0.05, seed=1)  # cold: every draw is uncertain
    rng = random.Random(0)
    cands = [NONE, NGRAM, Candidate("lookahead")]
    for _ in range(400):
        f = world.features(0, rng.random(), rng)
        choice = sel.choose(f, cands)
        sel.observe(choice, world.BASE_TPS)
    assert 0 < sel.stats.explored <= 0.05 * 400 + 1
    before = sel.stats.explored
    for _ in range(100):
        sel.choose(world.features(0, 0.5, rng), cands, explore=False)
    assert sel.stats.explored == before
    with pytest.raises(ValueError):
        MethodSelector(None, explore_rate=1.5)


def test_lossy_candidates_need_the_request_and_a_measured_quality():
    recs = world.records([0, 1], 20, ["none"])
    rng = random.Random(4)
    for _ in range(40):
        f = world.features(0, rng.random() * 0.2, rng)
        recs.append(world.record("none", f, world.speed("int8", f), pool="q8",
                                 quantization="int8"))
    model = train(recs, FAST)
    sel = MethodSelector(model, explore_rate=1.0, seed=0)  # explores whenever it may
    cands = [Candidate("none", "default"), Candidate("none", "q8", quantization="int8")]
    f = world.features(0, 0.1, rng)
    for _ in range(50):
        assert not sel.choose(f, cands).candidate.lossy  # not allowed by the request
        assert not sel.choose(f, cands, allow_lossy=True).candidate.lossy  # quality unknown
    sel = MethodSelector(model, explore_rate=0.0)
    good = sel.choose(f, cands, allow_lossy=True, quality={"q8": 0.99})
    assert good.candidate.pool == "q8"  # faster, and it agrees with full precision
    poor = sel.choose(f, cands, allow_lossy=True, quality={"q8": 0.5})
    assert poor.candidate.pool == "default"  # faster, but half its tokens differ
    with pytest.raises(ValueError, match="no eligible"):
        sel.choose(f, cands[1:])


def test_the_online_correction_keeps_only_its_latest_outcomes():
    rng = random.Random(6)
    ctx = selector.context(world.features(3, 0.0, rng), (0.0, 0.0, 0.0))
    kept = selector.OnlineCorrection(capacity=4)
    for residual in (5.0, 5.0, 1.0, 1.0, 1.0, 1.0):  # the two 5s fall out of the ring
        kept.add("ngram", ctx, residual)
    weight, weighted = kept.evidence("ngram", ctx)
    assert weight == pytest.approx(4.0) and weighted == pytest.approx(4.0)
    assert kept.evidence("none", ctx) == (0.0, 0.0)


def test_candidates_sharing_the_outcome_matrix_keep_their_own_latest_outcomes():
    """Outcomes of two candidates arrive interleaved into one matrix: each keeps its own latest
    `capacity`, and one pass weighs both as one at a time does."""
    rng = random.Random(7)
    ctx = selector.context(world.features(3, 0.0, rng), (0.0, 0.0, 0.0))
    kept = selector.OnlineCorrection(capacity=3)
    for name, residual in [("ngram", 9.0), ("lookahead", 2.0), ("ngram", 9.0), ("ngram", 1.0),
                           ("lookahead", 2.0), ("ngram", 1.0), ("ngram", 1.0)]:
        kept.add(name, ctx, residual)
    weights, weighted = kept.evidence_all(["ngram", "lookahead", "none"], ctx)
    assert weights.tolist() == pytest.approx([3.0, 2.0, 0.0])
    assert weighted.tolist() == pytest.approx([3.0, 4.0, 0.0])
    assert kept.evidence("lookahead", ctx) == pytest.approx((2.0, 4.0))
