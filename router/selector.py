"""Which candidate (method, pool) serves a request: a meta-learned prior plus what the router saw.

For each eligible candidate the selector forms a belief about its log decode tokens/s:
- the prior is the `SpeedModel` (trained on the whole cluster's history, across tasks): the
  ensemble's mean and spread; without a model, one belief so broad that the outcomes decide;
- on top, a Bayesian correction from this router's own recent outcomes with that candidate,
  weighted by a kernel on the request's context (task signature, lookup rate, code share, load):
  a few requests of a family the prior mispredicts are enough to move its belief for that family
  and not for others.

It serves the candidate of the highest believed speed (times its measured agreement, for a lossy
one). With Thompson sampling it draws from the beliefs instead; when the draw picks another
candidate that is an exploration, allowed only within the budget (`explore_rate` of requests,
default 5%), only for requests that did not turn it off, and never toward a lossy candidate the
request did not allow.
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from baton.router.features import SKETCH_DIM, RequestFeatures, signature_similarity
from baton.router.speed_model import NO_LOAD, Candidate, SpeedModel, inputs

NOISE_STD = 0.15  # spread of one request's log tokens/s around its expectation
COLD_STD = 3.0  # belief spread (log tokens/s around 0) without a model: the data decide
KERNEL_WIDTH = 0.5  # on the speed-driving features of the online correction's context
# Task signatures (estimated Jaccard similarity of bigram sets) less alike than this share no
# outcomes; those more alike by the ramp share them fully.
MIN_SIMILARITY = 0.25
SIMILARITY_RAMP = 0.25
# The least spread a prior belief gets: members trained on the same history agree with each other
# even where that history says nothing (a family never served), and a belief that sure would
# never be explored out of.
MIN_PRIOR_STD = 0.2


@dataclass(frozen=True, slots=True)
class Choice:
    """The selector's pick for one request."""

    candidate: Candidate
    predicted_tps: float  # believed decode tokens/s of the pick
    best_predicted_tps: float  # the highest believed speed among the eligible candidates
    explored: bool
    context: tuple[float, ...] = ()
    prior_log_tps: float = 0.0
    model_version: int = 0


def context(features: RequestFeatures, load: Sequence[float]) -> np.ndarray:
    """Where a request lies for the online correction: its task signature, then what drives
    speed (lookup rate, code share, greedy, load)."""
    return np.array([*features.sketch, 2 * features.lookup_hit_rate, 2 * features.code_share,
                     float(features.temperature == 0.0), load[0] / 2 if load else 0.0])


class OnlineCorrection:
    """Per candidate, this router's recent (context, residual log tokens/s) pairs.

    An outcome counts for a new request by how alike the two are: their task signatures'
    similarity (0 below `MIN_SIMILARITY`, full from `MIN_SIMILARITY + SIMILARITY_RAMP`), times a
    Gaussian kernel on the speed-driving features. Each candidate keeps its latest `capacity`
    outcomes. They share one matrix (a new outcome takes the next free row until its candidate
    holds `capacity`, then that candidate's oldest row), so a decision weighs every candidate's
    outcomes in a handful of array operations over the rows in use, however many candidates
    there are. Stacking 512 rows per candidate for every request cost the router about 0.7 ms a
    decision; eight array operations per candidate cost it 0.5 ms for four full candidates after
    an idle spell, when each operation costs tens of microseconds.
    """

    def __init__(self, capacity: int = 512):
        self.capacity = capacity
        self._block: dict[str, int] = {}  # candidate -> its index
        self._rows: list[collections.deque[int]] = []  # per candidate, its rows, oldest first
        self._ctxs = np.zeros((0, 0))
        self._res = np.zeros(0)
        self._owner = np.zeros(0, dtype=np.intp)
        self._used = 0  # rows [0, _used) hold outcomes

    def evidence(self, candidate: str, ctx: np.ndarray) -> tuple[float, float]:
        """(sum of weights, weighted sum of residuals) of the candidate's outcomes near `ctx`."""
        w, wr = self.evidence_all([candidate], ctx)
        return float(w[0]), float(wr[0])

    def evidence_all(self, candidates: Sequence[str], ctx: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
        """`evidence` of each of `candidates` at `ctx`, as two arrays."""
        weights, weighted = np.zeros(len(candidates)), np.zeros(len(candidates))
        blocks = [self._block.get(c) for c in candidates]
        n = self._used
        if n == 0 or all(b is None for b in blocks):
            return weights, weighted
        ctxs = self._ctxs[:n]
        sim = signature_similarity(ctxs[:, :SKETCH_DIM], ctx[:SKETCH_DIM])
        alike = np.clip((sim - MIN_SIMILARITY) / SIMILARITY_RAMP, 0, 1)
        near = np.exp(-((ctxs[:, SKETCH_DIM:] - ctx[SKETCH_DIM:]) ** 2).sum(1)
                      / (2 * KERNEL_WIDTH ** 2))
        w = alike * near
        owner, count = self._owner[:n], len(self._rows)
        sums = np.bincount(owner, weights=w, minlength=count)
        residual_sums = np.bincount(owner, weights=w * self._res[:n], minlength=count)
        for i, block in enumerate(blocks):
            if block is not None:
                weights[i], weighted[i] = sums[block], residual_sums[block]
        return weights, weighted

    def add(self, candidate: str, ctx: np.ndarray, residual: float) -> None:
        block = self._block.get(candidate)
        if block is None:
            block = self._block[candidate] = len(self._rows)
            self._rows.append(collections.deque())
        rows = self._rows[block]
        if len(rows) < self.capacity:
            row = self._used
            self._used += 1
            if row >= len(self._res):  # room for as many rows again
                size = max(2 * len(self._res), 64)
                ctxs = np.zeros((size, len(ctx)))
                if row:
                    ctxs[:row] = self._ctxs[:row]
                self._ctxs = ctxs
                self._res = np.concatenate([self._res, np.zeros(size - len(self._res))])
                self._owner = np.concatenate(
                    [self._owner, np.zeros(size - len(self._owner), dtype=np.intp)])
        else:
            row = rows.popleft()
        rows.append(row)
        self._ctxs[row], self._res[row], self._owner[row] = ctx, residual, block

    def clear(self) -> None:
        self._block.clear()
        self._rows.clear()
        self._used = 0


@dataclass(slots=True)
class SelectorStats:
    chosen: collections.Counter[str] = field(default_factory=collections.Counter)
    decisions: int = 0
    explored: int = 0
    observed: int = 0
    regret: float = 0.0  # summed max(0, 1 - achieved / best believed)


class MethodSelector:
    """Picks a candidate per request and learns from the outcomes (see the module doc)."""

    def __init__(self, model: SpeedModel | None = None, *, explore_rate: float = 0.05,
                 seed: int | None = None):
        if not 0.0 <= explore_rate <= 1.0:
            raise ValueError(f"explore_rate must be in [0, 1], got {explore_rate}")
        self.model = model
        self.explore_rate = explore_rate
        self.correction = OnlineCorrection()
        self.stats = SelectorStats()
        self._rng = random.Random(seed)

    def set_model(self, model: SpeedModel | None) -> None:
        """Take a newer prior; the online correction was relative to the old one, so it restarts."""
        self.model = model
        self.correction.clear()

    def beliefs(self, features: RequestFeatures, load: Mapping[str, Sequence[float]],
                candidates: Sequence[Candidate]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prior mean, posterior mean, posterior std) of each candidate's log tokens/s."""
        n = len(candidates)
        if self.model is not None:
            req = features.vector()
            x = np.array([inputs(req, load.get(c.pool, NO_LOAD), c, self.model.pools)
                          for c in candidates])
            members = self.model.predict(x)
            prior = members.mean(0)
            prior_std = np.maximum(members.std(0), MIN_PRIOR_STD)
        else:
            prior, prior_std = np.zeros(n), np.full(n, COLD_STD)
        w, wr = np.zeros(n), np.zeros(n)
        by_pool: dict[str, list[int]] = {}  # candidates sharing a context
        for i, c in enumerate(candidates):
            by_pool.setdefault(c.pool, []).append(i)
        for pool, idx in by_pool.items():
            ctx = context(features, load.get(pool, NO_LOAD))
            w[idx], wr[idx] = self.correction.evidence_all([candidates[i].name for i in idx],
                                                           ctx)
        precision = 1 / prior_std ** 2 + w / NOISE_STD ** 2
        mean = prior + (wr / NOISE_STD ** 2) / precision
        return prior, mean, np.sqrt(1 / precision)

    def choose(self, features: RequestFeatures, candidates: Sequence[Candidate], *,
               load: Mapping[str, Sequence[float]] | None = None,
               quality: Mapping[str, float] | None = None, allow_lossy: bool = False,
               explore: bool = True) -> Choice:
        """The candidate for this request. `load` maps a pool to its `LOAD_FEATURES`; `quality`
        a lossy candidate's pool to its measured token agreement with full precision (a lossy
        candidate without one is never chosen). Raises ValueError when none is eligible."""
        load, quality = load or {}, quality or {}
        eligible = [c for c in candidates
                    if not c.lossy or (allow_lossy and c.pool in quality)]
        if not eligible:
            raise ValueError("no eligible candidate")
        prior, mean, std = self.beliefs(features, load, eligible)
        gain = np.log([quality.get(c.pool, 1.0) if c.lossy else 1.0 for c in eligible])
        score = mean + gain
        best = int(np.argmax(score))
        pick, explored = best, False
        s = self.stats
        if explore and (s.explored + 1) <= self.explore_rate * (s.decisions + 1):
            draw = score + std * np.array([self._rng.gauss(0, 1) for _ in eligible])
            pick = int(np.argmax(draw))
            explored = pick != best
        s.decisions += 1
        s.explored += explored
        c = eligible[pick]
        s.chosen[c.method] += 1
        return Choice(candidate=c, predicted_tps=math.exp(mean[pick]),
                      best_predicted_tps=math.exp(score[best]), explored=explored,
                      context=tuple(context(features, load.get(c.pool, NO_LOAD)).tolist()),
                      prior_log_tps=float(prior[pick]),
                      model_version=self.model.info.version if self.model else 0)

    def observe(self, choice: Choice, achieved_tps: float) -> None:
        """What the chosen candidate achieved (decode tokens/s) for that request."""
        if not achieved_tps > 0:
            return
        log_tps = math.log(achieved_tps)
        self.correction.add(choice.candidate.name, np.array(choice.context),
                            log_tps - choice.prior_log_tps)
        s = self.stats
        s.observed += 1
        s.regret += max(0.0, 1.0 - achieved_tps / choice.best_predicted_tps)
