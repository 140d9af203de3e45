"""`make demo` shows the concurrent streams side by side, then the summary table."""

from __future__ import annotations

import io

from rich.console import Console

from baton.ops.demo import Trace, board, summary


def _render(renderable, width: int = 160) -> list[str]:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue().splitlines()


def test_the_streams_share_rows_each_in_its_own_panel() -> None:
    traces = [Trace("long", 0.0, tokens=3, path="disaggregated", text=["The bread", " note"]),
              Trace("short0", 0.0, tokens=2, path="local", text=["Red,", " blue"],
                    finish_reason="stop"),
              Trace("short1", 0.0)]
    lines = _render(board(traces))
    titles = [line for line in lines if "long" in line]
    assert titles and all(label in titles[0] for label in ("long", "short0", "short1"))
    body = next(line for line in lines if "The bread" in line)
    assert "Red, blue" in body  # the second stream's text beside the first's, not below it
    footer = next(line for line in lines if "3/64 tok" in line)
    assert "2/64 tok · stop" in footer and "0/64 tok · waiting" in footer
    assert "disaggregated" in titles[0] and "local" in titles[0]


def test_the_summary_has_a_row_per_request() -> None:
    t = Trace("long", 0.0, first=0.25, last=1.25, tokens=11, path="disaggregated",
              kv_bytes=3 * 2**20, prompt_tokens=900)
    row = next(line for line in _render(summary([t])) if "long" in line)
    assert "disaggregated" in row and "900" in row and "250" in row and "100.0" in row
    assert "3.00 MiB" in row


def test_a_failed_request_shows_why_in_its_own_panel() -> None:
    traces = [Trace("long", 0.0, error="prompt over the model's context; shorten the prompt"),
              Trace("short0", 0.0, tokens=1, text=["Red"], finish_reason="length")]
    lines = _render(board(traces))
    assert any("0/64 tok · failed" in line for line in lines)
    assert any("1/64 tok · length" in line for line in lines)
    assert any("shorten" in line for line in lines)
    row = next(line for line in _render(summary(traces)) if "long" in line)
    assert "failed" in row
