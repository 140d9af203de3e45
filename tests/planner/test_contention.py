"""Slow windows: an engine's own work against wall time while another worker runs a prompt."""

from __future__ import annotations

import pytest

from baton.cluster.planner.contention import Slowdown


def test_work_in_a_window_takes_one_plus_the_share_as_long() -> None:
    slow = Slowdown(1.0)
    assert slow.when(0.0, 2.0) == 2.0  # no window: full speed
    slow.add(1.0, 3.0)
    # 1 s before the window, then 2 s of wall time hold 1 s of work at half speed.
    assert slow.when(0.0, 2.0) == pytest.approx(3.0)
    assert slow.when(0.0, 3.0) == pytest.approx(4.0)  # past the window: full speed again
    assert slow.work(0.0, 3.0) == pytest.approx(2.0)
    for work in (0.5, 1.0, 1.7, 2.0, 2.9, 5.0):
        assert slow.work(0.0, slow.when(0.0, work)) == pytest.approx(work)


def test_overlapping_windows_slow_their_union_once() -> None:
    slow = Slowdown(0.5)
    slow.add(2.0, 4.0)
    slow.add(3.0, 5.0)
    slow.add(7.0, 7.0)  # empty: nothing
    assert slow.windows == [(2.0, 5.0)]
    assert slow.work(0.0, 6.0) == pytest.approx(6.0 - 3.0 * 0.5 / 1.5)
    slow.clear()
    assert slow.work(0.0, 6.0) == 6.0
    with pytest.raises(ValueError, match="share"):
        Slowdown(0.0)
