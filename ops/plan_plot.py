"""The plot `baton plan` draws: goodput against cost for every layout it considered."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the file backend

from baton.cluster.planner.layout import Layout  # noqa: E402
from baton.cluster.planner.search import Evaluated  # noqa: E402


def plot(ranked: list[Evaluated], winner: Layout, path: str | Path, title: str) -> None:
    """Scatter goodput (requests/s within SLOs) against $/h, colocated and disaggregated apart,
    the winner's base layout ringed."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("colocated", "o"), ("disaggregated", "^")):
        pts = [e for e in ranked if e.layout.kind == kind]
        ax.scatter([e.price_per_hour for e in pts], [e.goodput_rps for e in pts], marker=marker,
                   alpha=0.6, label=kind)
    best = ranked[0]
    ax.scatter([best.price_per_hour], [best.goodput_rps], s=200, facecolors="none",
               edgecolors="red", label=f"best per $: {best.layout.label()}")
    ax.set_xlabel("cost ($/h)")
    ax.set_ylabel("goodput (requests/s within SLOs)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
