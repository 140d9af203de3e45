"""Engines that share one machine slow each other: the wall-clock windows in which an engine's
iterations run at `1 / (1 + share)` of their speed, and the mapping between the work a decode run
has done (seconds at full speed) and wall time, for `engine_sim`."""

from __future__ import annotations


class Slowdown:
    """One engine's slow windows for the run under way (merged, in time order)."""

    def __init__(self, share: float) -> None:
        if share <= 0:
            raise ValueError(f"a slowdown needs a share > 0, got {share}")
        self.share = share
        self.windows: list[tuple[float, float]] = []

    def clear(self) -> None:
        """A new run: no window yet."""
        self.windows = []

    def add(self, start: float, end: float) -> None:
        """Slow [start, end) too (overlapping windows slow it once)."""
        if end <= start:
            return
        merged: list[tuple[float, float]] = []
        for a, b in sorted([*self.windows, (start, end)]):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.windows = merged

    def work(self, t0: float, t: float) -> float:
        """Full-speed seconds of work done from `t0` to `t`."""
        done = t - t0
        lost = self.share / (1 + self.share)
        for a, b in self.windows:
            overlap = min(b, t) - max(a, t0)
            if overlap > 0:
                done -= overlap * lost
        return done

    def when(self, t0: float, work: float) -> float:
        """The wall time at which `work` full-speed seconds started at `t0` are done."""
        t, left = t0, work
        for a, b in self.windows:
            if b <= t:
                continue
            if a > t:  # full speed up to the window
                if left <= a - t:
                    return t + left
                left -= a - t
                t = a
            room = (b - t) / (1 + self.share)  # work the window holds
            if left <= room:
                return t + left * (1 + self.share)
            left -= room
            t = b
        return t + left
