"""The machine a benchmark ran on, and how busy other processes kept it meanwhile.

These machines are shared: a figure measured while something else took the cores is skewed, so
every benchmark records the other processes' share of the CPU over its timed part and flags it
above `NOISY`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from rich.console import Console

NOISY = 0.15  # other processes' share of the CPU above which a figure is flagged


def machine_info(threads: int, packages: Iterable[str] = ()) -> dict[str, Any]:
    """CPU model, cores, load, the threads the run used, and the versions of Python, torch and
    `packages` (distribution names)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads,
                            "loadavg": os.getloadavg(), "python": platform.python_version()}
    for name in ("torch", *packages):
        with contextlib.suppress(PackageNotFoundError):
            info[name] = version(name)
    return info


def cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU-seconds of the whole machine incl. steal, CPU-seconds of this process)."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK"), sum(os.times()[:2])


class OtherCPUBusy:
    """Share of the machine's CPU that processes other than this one use from its creation.

    `share()` is None where /proc/stat cannot be read.
    """

    def __init__(self) -> None:
        self._before, self._t0 = cpu_seconds(), time.perf_counter()

    def share(self, also_ours_s: float = 0.0) -> float | None:
        """`also_ours_s`: CPU seconds the run's own other processes (its actors) used meanwhile."""
        after, elapsed = cpu_seconds(), time.perf_counter() - self._t0
        if self._before is None or after is None:
            return None
        busy = (after[0] - self._before[0]) - (after[1] - self._before[1]) - also_ours_s
        return max(0.0, busy / (elapsed * (os.cpu_count() or 1)))


def warn_if_busy(console: Console, shares: Mapping[str, float | None], advice: str) -> None:
    """Say which parts of the run other processes kept busy past `NOISY`, and `advice`."""
    busy = {k: v for k, v in shares.items() if v is not None and v > NOISY}
    if busy:
        console.print("[yellow]other processes were busy during "
                      + ", ".join(f"{k} ({v:.0%} of the CPU)" for k, v in busy.items())
                      + f": {advice}[/]")
