"""The selector's model in a real Redis: trained from the history, shared by every router, kept
when Redis goes away (mid-training too), retrained in the background once enough history came."""

from __future__ import annotations

import random

import numpy as np
import pytest

from baton.cluster.state import ClusterState
from baton.errors import InvalidRequestError
from baton.router.selection import PoolOffer, Selection, SelectionSettings
from baton.router.speed_model import Candidate
from baton.sampling import SamplingParams
from tests.conftest import wait_until
from tests.router import selector_world as world


class Vocab:
    """What selection asks of a tokenizer: its vocabulary."""

    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(6000)}


CANDS = [Candidate("none"), Candidate("ngram")]


def selection(state: ClusterState | None, **settings) -> Selection:
    sel = Selection(Vocab(), 6000, state, SelectionSettings(**settings))
    sel.offers = {"default": PoolOffer(("none", "ngram"))}
    return sel


def fill(state: ClusterState, n_per_family: int, families=(0, 1, 2), seed: int = 0) -> None:
    for rec in world.records(list(families), n_per_family, ["none", "ngram"], seed=seed):
        state.record(rec)
    assert state.flush()


def beliefs(sel: Selection, seed: int = 0) -> np.ndarray:
    f = world.features(4, 0.5, random.Random(seed))
    return sel.selector.beliefs(f, {}, CANDS)[1]


def test_a_model_trained_from_history_is_shared_by_every_router(redis_url):
    state = ClusterState(redis_url, "sel-share")
    fill(state, 12)
    first = selection(state)
    assert first.train_and_store() == 1
    other = selection(ClusterState(redis_url, "sel-share"))
    assert other.version == 0 and other.load_latest() and other.version == 1
    assert np.allclose(beliefs(first), beliefs(other))
    assert not other.load_latest()  # nothing newer
    # A second training is the next version, and the other router takes it on its next look.
    fill(state, 12, seed=1)
    assert first.train_and_store() == 2
    other.refresh()
    assert other.version == 2 and np.allclose(beliefs(first), beliefs(other))


def test_a_restarted_router_starts_with_the_stored_model(own_server):
    state = ClusterState(own_server.url, "sel-restart")
    fill(state, 12)
    version = selection(state).train_and_store()
    state.close()
    own_server.stop()
    own_server.start()  # the stored model survives a Redis restart too (append-only file)
    again = selection(ClusterState(own_server.url, "sel-restart"))
    again.refresh()
    assert again.version == version == 1


def test_redis_going_away_mid_training_keeps_the_routers_model(own_server):
    state = ClusterState(own_server.url, "sel-outage", timeout_s=0.2, backoff_s=0.05,
                         max_backoff_s=0.2)
    fill(state, 12)
    sel = selection(state, train_in_background=True, train_min_new=10, train_interval_s=0.01)
    assert sel.train_and_store() == 1
    before = beliefs(sel)

    class GoesAway:  # the state, except that Redis stops between reading and storing
        def __getattr__(self, name):
            return getattr(state, name)

        def save_selector_model(self, blob, **info):
            own_server.stop()
            return state.save_selector_model(blob, **info)

    fill(state, 12, seed=1)
    sel.state = GoesAway()
    assert sel.train_and_store() is None  # trained, but Redis took no model
    assert sel.selector.model is not None and sel.version == 1
    sel.refresh()  # upkeep while Redis is away: no error, nothing lost
    assert not sel.load_latest()
    choice = sel.choose(world.features(0, 0.5, random.Random(0)),
                        SamplingParams(method="auto"), {})
    assert choice.candidate.method in ("none", "ngram")
    own_server.start()
    sel.state = state
    # Once the outage's backoff is over: the stored model is still the last one stored.
    assert wait_until(lambda: state.selector_version(), 10, "Redis back") == 1
    assert not np.allclose(before, beliefs(sel))  # the router serves with its newer model


def test_background_training_waits_for_enough_new_history_and_one_router_trains(redis_url):
    state = ClusterState(redis_url, "sel-background")
    a = selection(state, train_min_new=40, train_interval_s=60)
    b = selection(ClusterState(redis_url, "sel-background"), train_min_new=40,
                  train_interval_s=60)
    fill(state, 6, families=(0, 1))  # 24 records: not enough
    a.refresh()
    assert a.version == 0 and state.selector_version() == 0
    fill(state, 6, families=(2, 3), seed=1)  # 48 in all
    a.refresh()
    assert a.version == 1 and a.trainings == 1
    b.refresh()  # the model is fresh and another router holds the training lock
    assert b.version == 1 and b.trainings == 0


def test_auto_requests_need_a_lossless_pool_unless_they_allow_lossy():
    sel = selection(None)
    sel.offers = {"q4": PoolOffer(("none",), quantization="int4")}
    f = world.features(0, 0.3, random.Random(0))
    with pytest.raises(InvalidRequestError, match="allow_lossy"):
        sel.choose(f, SamplingParams(method="auto"), {})
    with pytest.raises(InvalidRequestError, match="baton router quality"):
        sel.choose(f, SamplingParams(method="auto", allow_lossy=True), {})
    sel.quality = {"q4": 0.97}
    choice = sel.choose(f, SamplingParams(method="auto", allow_lossy=True), {})
    assert choice.candidate.pool == "q4"
