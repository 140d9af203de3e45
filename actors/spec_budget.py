"""How many tokens each speculating request drafts this step (adaptive k).

A draft of k tokens whose tokens are each accepted with probability a yields
(1 - a^(k+1)) / (1 - a) tokens in one step, and makes the step run k more tokens. The step's cost
grows with its tokens as measured on this engine (a + b * tokens, fitted online), so while a step
is memory-bound (b small: GPU decode, batch 1 on a CPU) long drafts are nearly free, and once it is
compute-bound (large batches) the marginal draft token costs more than it is expected to yield and
speculation switches itself off (SmartSpec's goodput rule, applied per token).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from baton.actors.sequence import Sequence


class StepCostModel:
    """Seconds of one forward pass as `a + b * tokens`, least squares over recent steps.

    Steps are kept per size class (tokens 1, 2-3, 4-7, ...; the latest `per_size` of each), not
    as one window of the latest steps: after a quiet spell of one-token steps the window would
    hold only those, fit almost no cost per token, and draft freely into a burst of 16 requests
    where each token costs. Every size seen recently keeps its say in the fit."""

    def __init__(self, per_size: int = 16, prior_ratio: float = 1 / 32):
        self.per_size = per_size
        self.prior_ratio = prior_ratio  # b / a before the steps say otherwise
        self._by_size: dict[int, deque[tuple[int, float]]] = {}
        self._fit: tuple[float, float] | None = None  # until the next observation

    @property
    def samples(self) -> list[tuple[int, float]]:
        """The steps the fit uses, (tokens, seconds)."""
        return [s for steps in self._by_size.values() for s in steps]

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            size = tokens.bit_length()  # 1, 2-3, 4-7, ...
            if size not in self._by_size:
                self._by_size[size] = deque(maxlen=self.per_size)
            self._by_size[size].append((tokens, seconds))
            self._fit = None

    def coefficients(self) -> tuple[float, float]:
        """(a, b) in seconds and seconds per token (relative units before any step ran)."""
        if self._fit is None:
            self._fit = self._least_squares()
        return self._fit

    def _least_squares(self) -> tuple[float, float]:
        samples = self.samples
        if not samples:
            return 1.0, self.prior_ratio
        n = len(samples)
        mx = sum(t for t, _ in samples) / n
        my = sum(s for _, s in samples) / n
        var = sum((t - mx) ** 2 for t, _ in samples)
        if var < 1e-9 * n or n < 8:
            # One batch shape seen so far: split its cost by the prior.
            a = my / (1 + self.prior_ratio * mx)
            return a, a * self.prior_ratio
        b = sum((t - mx) * (s - my) for t, s in samples) / var
        b = max(b, 0.0)
        a = max(my - b * mx, 1e-6)
        return a, b


@dataclass(slots=True)
class Candidate:
    """A request that may draft: its acceptance estimate, its cap, and the extra seconds one
    more draft token costs it outside the target's pass (a draft model's forward).

    `gains`, when given, are the expected tokens of its 1st, 2nd, ... draft token directly, not
    the chain's acceptance^i: a tree whose nodes carry their own chance of being accepted (Medusa's
    path probabilities, best first)."""

    acceptance: float
    max_k: int
    draft_cost: float = 0.0
    gains: list[float] | None = None

    def gain(self, k: int) -> float:
        """Expected tokens of its (k+1)-th draft token; -1 past its cap."""
        if k >= self.max_k:
            return -1.0
        if self.gains is not None:
            return self.gains[k] if k < len(self.gains) else -1.0
        return self.acceptance ** (k + 1)


def choose_k(cands: list[Candidate], base_tokens: int, budget: int,
             cost: StepCostModel) -> list[int]:
    """Draft lengths that maximize expected tokens per second for this step."""
    a, b = cost.coefficients()
    ks = [0] * len(cands)
    tokens = max(base_tokens, 1)
    expected = float(tokens)  # every scheduled request yields at least one token
    seconds = a + b * tokens
    room = budget - base_tokens
    while room > 0 and cands:
        gains = [c.gain(k) for c, k in zip(cands, ks, strict=True)]
        best = max(range(len(cands)), key=gains.__getitem__)
        if gains[best] <= 0.0:
            break
        extra = b + cands[best].draft_cost
        if (expected + gains[best]) * seconds <= expected * (seconds + extra):
            break  # the best next token no longer pays for itself
        expected += gains[best]
        seconds += extra
        ks[best] += 1
        room -= 1
    return ks


class AcceptanceTracker:
    """A request's per-token acceptance, from decayed counts of accepted and rejected drafts.

    Only a draft tells how drafts fare, so a request whose estimate fell too low to draft would
    keep it for good, however its text changes (open prose, then a passage copied from the
    prompt). Each step it goes without a draft, `relax` moves the counts back toward the prior:
    after a dozen or so such steps it tries again, and one more rejection turns it off again.
    """

    def __init__(self, prior: float, strength: float = 2.0, decay: float = 0.85,
                 recovery: float = 0.9):
        self.prior = prior
        self.strength = strength
        self.accepted = prior * strength
        self.trials = strength
        self.decay = decay
        self.recovery = recovery  # kept of the counts per step without a draft

    @property
    def rate(self) -> float:
        return min(max(self.accepted / self.trials, 0.0), 0.98)

    def update(self, drafted_depth: int, accepted: int) -> None:
        """`accepted` of a draft `drafted_depth` deep were taken (a rejection ends the run)."""
        if drafted_depth <= 0:
            return
        self.accepted = self.decay * self.accepted + accepted
        self.trials = self.decay * self.trials + accepted + (1 if accepted < drafted_depth else 0)

    def relax(self) -> None:
        """A step without a draft: move one step of `recovery` back toward the prior."""
        keep, fresh = self.recovery, (1.0 - self.recovery) * self.strength
        self.accepted = keep * self.accepted + fresh * self.prior
        self.trials = keep * self.trials + fresh


class HeadsBackoff:
    """Steps the Medusa heads sit out after passes whose trees paid for no draft.

    The heads run for a request when one draft token at its recent acceptance would pay for
    itself and its share of the pass; the trees they draw then go into the step only where
    their own path probabilities pay, and the pass itself is paid by then. In a large,
    compute-bound batch the first test can pass while the drafts that come of it are too few to
    cover the pass: 16 requests of the default model here ran a heads pass on 95 of 96 steps
    (0.5 ms of a 20 ms step) for 19 accepted tokens in 1,488. After a pass whose drafts are not
    expected to cover its time (as a share of the step's tokens and time), the heads sit out 1,
    3, 7, ... steps (at most `max_steps`); a pass that pays ends the backoff, and so does a
    batch half the size of the one that wasted a pass. Requests that fixed their draft length
    always get the heads.
    """

    def __init__(self, max_steps: int = 32):
        self.max_steps = max_steps
        self.wasted = 0  # consecutive passes without a draft
        self.skip = 0  # steps still to sit out
        self._batch = 0  # decoding requests at the last wasted pass

    def admit(self, seqs: list[Sequence], batch: int) -> list[Sequence]:
        """Of the requests the heads would run for, those they run for this step."""
        if self.skip and 2 * batch <= self._batch:  # the batch halved: try again
            self.skip = self.wasted = 0
        if self.skip <= 0:
            return seqs
        self.skip -= 1
        return [s for s in seqs if s.params.num_speculative_tokens]

    def passed(self, paid: bool, batch: int) -> None:
        """A heads pass ran; `paid`: the drafts it gave are expected to cover its time."""
        if paid:
            self.wasted = self.skip = 0
            return
        self.wasted += 1
        self.skip = min(2 ** self.wasted - 1, self.max_steps)
        self._batch = batch
