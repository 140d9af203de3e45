"""The router's method selection: candidates from the pools, features, the shared model in Redis.

`Selection` is what the router calls per request (`features`, `choose`, `finished`) and what
keeps the selector's model current: every `poll_s` it looks for a newer version in Redis and
loads it (so every router serves with the same model, and a restarted one starts with it), and
when enough new history arrived since the model was trained it trains a new one in a thread
(one router at a time, under a Redis lock) and stores it as the next version. With Redis away
nothing of this fails a request: the router keeps the model it has.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from baton.errors import InvalidRequestError
from baton.records import PerfRecord, WorkerStatus
from baton.router.features import RequestFeatures, request_features, tokenizer_flags
from baton.router.selector import Choice, MethodSelector
from baton.router.selector_training import NotEnoughHistory, train
from baton.router.speed_model import Candidate, Load, SpeedModel
from baton.sampling import SamplingParams
from baton.speculation import NONE

log = logging.getLogger(__name__)


class SelectorState(Protocol):
    """What selection needs of the cluster's shared state (`ClusterState`)."""

    @property
    def available(self) -> bool: ...

    def history(self, limit: int = 1000, since: float | None = None) -> list[PerfRecord]: ...

    def selector_version(self) -> int | None: ...

    def selector_model(self) -> tuple[int, bytes, dict[str, Any]] | None: ...

    def save_selector_model(self, blob: bytes, **info: Any) -> int | None: ...

    def quality(self) -> dict[str, float]: ...

    def try_lock(self, name: str, ttl_s: float) -> bool: ...

    def workers(self, pool: str | None = None) -> list[WorkerStatus]: ...


@dataclass(slots=True)
class SelectionSettings:
    explore_rate: float = 0.05  # at most this share of `auto` requests explore
    poll_s: float = 10.0  # how often to look for a newer model in Redis
    train_in_background: bool = True
    train_min_new: int = 200  # new records since the model's training that start a retraining
    train_interval_s: float = 300.0  # at most one background training per this
    history_limit: int = 20_000  # records a training reads, newest
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class PoolOffer:
    """What one pool serves: its methods and its weight format."""

    methods: tuple[str, ...] = (NONE,)
    quantization: str | None = None


class Selection:
    """Per-request method selection for one router; see the module doc."""

    def __init__(self, tokenizer: Any, vocab_size: int, state: SelectorState | None = None,
                 settings: SelectionSettings | None = None):
        self.settings = settings or SelectionSettings()
        self.state = state
        self.selector = MethodSelector(explore_rate=self.settings.explore_rate,
                                       seed=self.settings.seed)
        self.flags_by_id = tokenizer_flags(tokenizer, vocab_size)
        self.offers: dict[str, PoolOffer] = {}
        self.quality: dict[str, float] = {}
        self.kv_usage: dict[str, float] = {}  # pool -> mean KV usage of its workers (registry)
        self.waiting: dict[str, float] = {}  # pool -> requests queued per worker (registry)
        self.errors: list[float] = []  # |log predicted - log achieved| of recent selections
        self.trainings = 0
        self._task: asyncio.Task | None = None

    # -- per request ------------------------------------------------------------------------------

    def features(self, ids: Sequence[int], params: SamplingParams) -> RequestFeatures:
        return request_features(ids, params.max_tokens, params.temperature, params.top_p,
                                self.flags_by_id)

    def offer(self, pool: str, info: dict[str, Any]) -> None:
        """Note what a pool serves, from one of its workers' `info()`."""
        self.offers[pool] = PoolOffer(tuple(info.get("methods") or (NONE,)),
                                      info.get("quantization"))

    def candidates(self) -> list[Candidate]:
        out = [Candidate(m, pool, None, offer.quantization)
               for pool, offer in sorted(self.offers.items())
               for m in sorted(offer.methods, key=lambda m: m != NONE)]  # none first: ties
        return out or [Candidate(NONE)]

    def choose(self, features: RequestFeatures, params: SamplingParams,
               load: dict[str, Load]) -> Choice:
        """The candidate for an `auto` request; raises `InvalidRequestError` when none fits.

        A request with a seed is never explored with: it asked to be reproducible, and another
        method samples differently (from the same distribution)."""
        try:
            return self.selector.choose(
                features, self.candidates(), load=load, quality=self.quality,
                allow_lossy=params.allow_lossy,
                explore=not params.disable_exploration and params.seed is None)
        except ValueError as exc:
            if params.allow_lossy:
                raise InvalidRequestError(
                    "no pool can serve this request: the quantized pools' agreement with full "
                    "precision is not measured yet; measure it with `baton router quality "
                    "POOL`") from exc
            raise InvalidRequestError(
                "no pool can serve this request losslessly; set allow_lossy to use a pool with "
                "quantized weights") from exc

    @staticmethod
    def apply(choice: Choice, params: SamplingParams) -> SamplingParams:
        """The request's parameters with the chosen method (and k, when the candidate fixes it)."""
        c = choice.candidate
        k = c.k if c.k is not None else params.num_speculative_tokens
        return dataclasses.replace(params, method=c.method, num_speculative_tokens=k)

    def finished(self, choice: Choice | None, record: PerfRecord) -> None:
        """Learn from a finished request (only selector-chosen ones feed the online correction)."""
        tps = record.decode_tokens_per_s
        if choice is None or not tps or record.output_tokens < 2:
            return
        self.selector.observe(choice, tps)
        self.errors.append(abs(np.log(choice.predicted_tps / tps)))
        del self.errors[:-1024]

    # -- the shared model -------------------------------------------------------------------------

    @property
    def version(self) -> int:
        m = self.selector.model
        return m.info.version if m is not None else 0

    def load_latest(self) -> bool:
        """Take the stored model if it is newer than ours; True when one was loaded."""
        if self.state is None:
            return False
        stored = self.state.selector_version()
        if not stored or stored <= self.version:
            return False
        found = self.state.selector_model()
        if found is None:
            return False
        version, blob, _ = found
        try:
            model = SpeedModel.from_bytes(blob)
        except ValueError:
            log.exception("stored selector model v%d is unreadable; keeping v%d", version,
                          self.version)
            return False
        model.info.version = version
        self.selector.set_model(model)
        log.info("selector model v%d loaded (%d records)", version, model.info.records)
        return True

    def train_and_store(self, records: Sequence[PerfRecord] | None = None) -> int | None:
        """Train on `records` (None: the history in Redis), store it as the next version and use
        it; the version, or None when Redis took no model (this router still uses it)."""
        if records is None:
            if self.state is None:
                raise NotEnoughHistory("no Redis: train from a file of records instead")
            records = self.state.history(limit=self.settings.history_limit)
        model = train(records)
        model.info.version = self.version  # a local model until Redis numbers it
        version = None
        if self.state is not None:
            version = self.state.save_selector_model(
                model.to_bytes(), records=model.info.records, trained_at=model.info.trained_at)
        if version is not None:
            model.info.version = version
        self.selector.set_model(model)
        self.trainings += 1
        return version

    def due_for_training(self) -> bool:
        if self.state is None or not self.settings.train_in_background:
            return False
        m = self.selector.model
        since = m.info.trained_at if m is not None else None
        if since is not None and time.time() - since < self.settings.train_interval_s:
            return False
        fresh = self.state.history(limit=self.settings.train_min_new, since=since)
        return len(fresh) >= self.settings.train_min_new

    def refresh(self) -> None:
        """One round of upkeep (blocking, run in a thread): newer model, quality, training."""
        if self.state is None:
            return
        self.load_latest()
        self.quality = self.state.quality() or self.quality
        usage: dict[str, list[tuple[float, int]]] = {}
        for w in self.state.workers():
            if w.load is not None:
                usage.setdefault(w.info.pool, []).append((w.load.kv_usage, w.load.waiting))
        self.kv_usage = {pool: sum(k for k, _ in u) / len(u) for pool, u in usage.items()}
        self.waiting = {pool: sum(n for _, n in u) / len(u) for pool, u in usage.items()}
        if self.due_for_training() and self.state.try_lock("selector-training",
                                                           self.settings.train_interval_s):
            try:
                self.train_and_store()
            except NotEnoughHistory as exc:
                log.info("selector training skipped: %s", exc)

    def start(self) -> None:
        if self.state is not None and self._task is None:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:  # noqa: BLE001 - upkeep never stops the router
                log.warning("selector upkeep failed; keeping model v%d", self.version,
                            exc_info=True)
            await asyncio.sleep(self.settings.poll_s)

    # -- reporting --------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        s = self.selector.stats
        m = self.selector.model
        return {
            "model_version": self.version,
            "model_age_s": time.time() - m.info.trained_at if m is not None else None,
            "model_records": m.info.records if m is not None else 0,
            "decisions": s.decisions, "explored": s.explored,
            "exploration_share": s.explored / s.decisions if s.decisions else 0.0,
            "chosen": dict(s.chosen),
            "mean_abs_log_error": float(np.mean(self.errors)) if self.errors else None,
            "estimated_regret": s.regret / s.observed if s.observed else None,
            "candidates": [c.name for c in self.candidates()],
        }

