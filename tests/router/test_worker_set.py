"""WorkerSet picks exactly as a plain scan would: the least loaded live worker, ties in turn."""

from __future__ import annotations

import itertools
import random

from baton.router.dispatch import WorkerSet


class ScanReference:
    """The rule written as a scan over every worker (what WorkerSet's buckets must agree with)."""

    def __init__(self, workers):
        self.load = {w: 0 for w in workers}
        self.turn = itertools.count()

    def pick(self, exclude=(), prefer=None):
        live = [w for w in self.load if w not in exclude]
        if not live:
            return None
        if prefer is not None and prefer in live:
            return prefer
        low = min(self.load[w] for w in live)
        least = [w for w in live if self.load[w] == low]
        return least[next(self.turn) % len(least)]


def test_picks_match_a_scan_through_holds_releases_drops_and_replacements() -> None:
    rng = random.Random(7)
    names = [f"w{i}" for i in range(12)]
    fast, ref = WorkerSet(names[:8]), ScanReference(names[:8])
    held = []
    for _ in range(3000):
        op = rng.random()
        if op < 0.45:
            prefer = rng.choice(names) if rng.random() < 0.1 else None
            exclude = rng.sample(names, 2) if rng.random() < 0.1 else ()
            w = fast.pick(exclude=exclude, prefer=prefer)
            assert w == ref.pick(exclude=exclude, prefer=prefer)
            if w is not None:
                ctx = fast.hold(w)
                ctx.__enter__()
                ref.load[w] += 1
                held.append((w, ctx))
        elif op < 0.9 and held:
            w, ctx = held.pop(rng.randrange(len(held)))
            ctx.__exit__(None, None, None)
            if w in ref.load:
                ref.load[w] -= 1
        elif op < 0.95:
            w = rng.choice(names)
            fast.drop(w)
            ref.load.pop(w, None)
        else:
            keep = rng.sample(names, rng.randint(1, len(names)))
            fast.replace(keep)
            ref.load = {w: ref.load.get(w, 0) for w in keep}
        assert fast.loads() == ref.load
