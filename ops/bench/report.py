"""What every benchmark does with its report: time the run, write the JSON, print the table."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console


def run_and_report(run: Callable[[Console], dict[str, Any]],
                   show: Callable[[dict[str, Any], Console], None],
                   json_path: str | None) -> dict[str, Any]:
    """`run(progress_console)`, add its wall time, write `json_path` if given, then `show` it."""
    t0 = time.perf_counter()
    report = run(Console(stderr=True))
    report["bench_wall_s"] = time.perf_counter() - t0
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    show(report, Console())
    return report


def ms(seconds: float | None) -> str:
    """Seconds as milliseconds for a table, one decimal; '-' for no figure."""
    return "-" if seconds is None else f"{seconds * 1000:.1f}"
