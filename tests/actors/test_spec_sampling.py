"""Under sampling, speculation keeps the output distribution: the two tokens after the first
(a one-token draft, then the target's own) match `none`'s in frequency (two-sample chi-square,
fixed seeds), and the check catches a broken acceptance rule. Also the adaptive-k rule: drafts
where a step is memory-bound, none where it is compute-bound."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from baton.actors import spec_verify
from baton.actors.draft_tree import DraftTree
from baton.actors.engine import Engine
from baton.actors.spec_budget import (
    AcceptanceTracker,
    Candidate,
    HeadsBackoff,
    StepCostModel,
    choose_k,
)
from baton.sampling import SamplingParams

N = 1000
PROMPT = list(range(256))  # every byte once: prompt lookup always finds the last token


@pytest.fixture(scope="module")
def engine() -> Engine:
    # A different tiny model drafts: its q differs from the target's p, so both acceptance and
    # the residual resampling are exercised.
    return Engine("tiny:llama", dtype="float32", draft_model="tiny:qwen2",
                  methods=["ngram", "draft"], max_num_seqs=256, max_num_batched_tokens=4096)


def _pairs(engine: Engine, method: str, seed0: int) -> Counter:
    """Frequencies of generated tokens 2 and 3 (the first comes from the prompt's step, where
    nothing is drafted)."""
    params = [SamplingParams(max_tokens=3, ignore_eos=True, temperature=1.5, top_k=6,
                             seed=seed0 + i, method=method,
                             num_speculative_tokens=None if method == "none" else 2)
              for i in range(N)]
    ids = [engine.add_request(PROMPT, p) for p in params]
    final = {}
    drafted = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = tuple(out.token_ids[1:])
                drafted += out.metrics.spec_draft_tokens
    if method != "none":
        assert drafted > N // 2, f"{method} drafted {drafted} tokens for {N} requests"
    return Counter(final[i] for i in ids)


def _chi_square_same(a: Counter, b: Counter, alpha_z: float = 3.09) -> tuple[bool, float, float]:
    """Two-sample chi-square homogeneity test (cells with few counts pooled), at about
    alpha = 0.001 (Wilson-Hilferty critical value)."""
    cells = sorted(set(a) | set(b), key=lambda c: -(a[c] + b[c]))
    rows, rest = [], [0, 0]
    for c in cells:
        if a[c] + b[c] >= 10:
            rows.append((a[c], b[c]))
        else:
            rest[0] += a[c]
            rest[1] += b[c]
    if sum(rest):
        rows.append(tuple(rest))
    na, nb = sum(a.values()), sum(b.values())
    stat = 0.0
    for x, y in rows:
        total = x + y
        ea, eb = total * na / (na + nb), total * nb / (na + nb)
        stat += (x - ea) ** 2 / ea + (y - eb) ** 2 / eb
    df = len(rows) - 1
    crit = df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3
    return stat < crit, stat, crit


@pytest.fixture(scope="module")
def plain_pairs(engine) -> Counter:
    return _pairs(engine, "none", 0)


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_sampled_distribution_matches_none(engine, plain_pairs, method):
    spec_pairs = _pairs(engine, method, 10**6)
    same, stat, crit = _chi_square_same(plain_pairs, spec_pairs)
    assert same, f"chi-square {stat:.1f} >= {crit:.1f}: {method} changed the distribution"


def test_seeded_speculative_sampling_is_reproducible(engine):
    params = SamplingParams(max_tokens=20, ignore_eos=True, temperature=1.0, seed=7,
                            method="draft", num_speculative_tokens=3)
    a, b = (engine.generate(["seeded"], params)[0].token_ids for _ in range(2))
    assert a == b


def test_the_check_catches_a_broken_acceptance_rule(engine, plain_pairs, monkeypatch):
    def accept_everything(draft, probs, generator):
        out = spec_verify.Verdict()
        for node in range(len(draft)):
            out.path.append(node)
            out.tokens.append(draft.tokens[node])
            out.rows.append(node)
        token = int(torch.multinomial(probs[len(draft)], 1, generator=generator))
        out.tokens.append(token)
        out.rows.append(len(draft))
        return out

    monkeypatch.setattr(spec_verify, "_verify_sampled", accept_everything)
    broken = _pairs(engine, "draft", 2 * 10**6)
    assert not _chi_square_same(plain_pairs, broken)[0]


def test_multi_candidate_tree_keeps_the_distribution():
    # p over 4 tokens; three deterministic candidates under the root, tried in turn.
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25] * 4, [0.25] * 4, [0.25] * 4])
    draft = DraftTree([3, 1, 0], [-1, -1, -1])
    gen = torch.Generator().manual_seed(0)
    counts = Counter(spec_verify._verify_sampled(draft, probs, gen).tokens[0]
                     for _ in range(20000))
    for token, p in enumerate(probs[0].tolist()):
        assert counts[token] / 20000 == pytest.approx(p, abs=0.015)


def _cost(per_token_ratio: float) -> StepCostModel:
    cost = StepCostModel()
    for tokens in (1, 4, 8, 16, 32, 64):
        for _ in range(3):
            cost.observe(tokens, 0.05 * (1 + per_token_ratio * tokens))
    return cost


def test_the_step_cost_remembers_large_steps_through_a_run_of_small_ones():
    """A burst after a quiet spell: hundreds of one-token steps must not crowd out what a
    16-token step was seen to cost, or drafting looks free at the burst's start."""
    cost = StepCostModel()
    for _ in range(20):
        cost.observe(16, 0.05 + 16 * 0.003)
    for _ in range(500):
        cost.observe(1, 0.05 + 0.003)
    a, b = cost.coefficients()
    assert a == pytest.approx(0.05, rel=1e-6) and b == pytest.approx(0.003, rel=1e-6)
    # So a batch of 16 with middling acceptance does not draft.
    assert sum(choose_k([Candidate(0.3, 8) for _ in range(16)], 16, 512, cost)) == 0
    # Each size keeps only its latest steps: a size whose cost changed shows the new cost.
    for _ in range(16):
        cost.observe(16, 0.05 + 16 * 0.006)
    assert cost.coefficients()[1] == pytest.approx((16 * 0.006 - 0.003) / 15, rel=1e-6)


def test_adaptive_k_drafts_when_memory_bound_and_stops_when_compute_bound():
    cands = [Candidate(0.7, 8) for _ in range(16)]
    # Memory-bound: 64 tokens cost 1.06x one token.
    assert sum(choose_k(cands[:1], 1, 512, _cost(0.001))) >= 4
    # Compute-bound: each token costs as much as the whole fixed part.
    assert sum(choose_k(cands, 16, 512, _cost(1.0))) == 0
    # Poor acceptance drafts less than good acceptance under the same costs.
    poor = choose_k([Candidate(0.1, 8)], 1, 512, _cost(0.05))
    good = choose_k([Candidate(0.9, 8)], 1, 512, _cost(0.05))
    assert poor[0] < good[0]


def test_a_tree_drafts_the_nodes_whose_own_acceptance_pays_for_them():
    """Medusa's nodes carry their path probabilities: a node is drafted exactly while its chance
    of being accepted beats what one more token costs the step."""
    cost = _cost(0.05)  # one more token costs 5% of a one-token step
    gains = [0.6, 0.3, 0.2, 0.12, 0.08, 0.04, 0.02]
    # Expected tokens 1 -> 1.6 -> 1.9 -> 2.1 -> 2.22 against step time 1.05 -> 1.25 (x 0.05 s):
    # the fifth node (0.08) would buy 3.6% more tokens for 4% more time.
    assert choose_k([Candidate(0.0, 8, gains=gains)], 1, 512, cost) == [4]
    # Neither past its gains nor past its cap.
    assert choose_k([Candidate(0.0, 8, gains=[0.9, 0.9])], 1, 512, _cost(0.001)) == [2]
    assert choose_k([Candidate(0.0, 1, gains=[0.9, 0.9])], 1, 512, _cost(0.001)) == [1]
    # Among requests, the likelier nodes go first.
    assert choose_k([Candidate(0.0, 8, gains=[0.2]), Candidate(0.0, 8, gains=[0.9, 0.8])],
                    2, 3, _cost(0.001)) == [0, 1]


def test_a_request_turned_off_by_rejections_tries_again_after_a_while():
    """A request whose drafts keep failing stops drafting when a draft has a cost of its own
    (Medusa's heads, a draft model); steps without a draft bring it back to try once more, and
    a new run of rejections turns it off again."""
    cost = _cost(0.001)
    heads = 0.2 * 0.05  # the heads' pass: a fifth of a one-token step

    def drafts(tracker: AcceptanceTracker) -> bool:
        return choose_k([Candidate(tracker.rate, 1, heads)], 1, 2, cost) == [1]

    tracker = AcceptanceTracker(0.5)
    assert drafts(tracker)
    for _ in range(4):
        tracker.update(4, 0)
    assert not drafts(tracker)
    idle = 0
    while not drafts(tracker):
        tracker.relax()
        idle += 1
        assert idle < 40, "never tried again"
    assert idle > 3  # not at once: a request that keeps failing drafts only now and then
    tracker.update(4, 0)
    tracker.update(4, 0)
    assert not drafts(tracker)


def test_heads_sit_out_longer_after_each_pass_that_does_not_pay():
    """1, 3, 7, ... steps without heads after passes whose drafts do not cover them; a pass that
    pays, or a batch half the size, ends it; requests with a fixed draft length keep them."""
    adaptive = [SimpleNamespace(params=SamplingParams(method="medusa")) for _ in range(15)]
    fixed = SimpleNamespace(params=SamplingParams(method="medusa", num_speculative_tokens=3))
    batch = [*adaptive, fixed]
    backoff = HeadsBackoff(max_steps=8)

    def sat_out() -> int:
        steps = 0
        while backoff.admit(batch, 16) == [fixed]:
            steps += 1
        return steps

    sat = []
    for _ in range(5):
        backoff.passed(False, 16)
        sat.append(sat_out())
    assert sat == [1, 3, 7, 8, 8]
    backoff.passed(True, 16)
    assert backoff.admit(batch, 16) == batch  # it paid: the heads run every step again
    backoff.passed(False, 16)
    backoff.passed(False, 16)
    assert backoff.admit(batch, 16) == [fixed]
    assert backoff.admit(batch[:8], 8) == batch[:8]  # the batch halved: they try again
