"""Workloads the planner simulates: length distributions with Poisson arrivals, or a replay.

Named workloads:
- `coding`, `conversation`: the Splitwise production traces (Azure, 2023) by their published
  medians (coding: 1500 prompt / 13 output tokens; conversation: 1020 / 129), as log-normal
  lengths around them (the spread, sigma, is this module's assumption, not a published figure).
- `bench-pd`, `bench-serve`: the mixed chat load of `baton bench pd` / `baton bench serve`
  (30% long prompts; uniform lengths in the benchmarks' ranges plus the chat template's tokens).
A replay file is a CSV with the Splitwise trace's columns (TIMESTAMP, ContextTokens,
GeneratedTokens) or JSONL with `arrival_s`, `prompt_tokens`, `output_tokens`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

import numpy as np

from baton.errors import ConfigError

MAX_TOKENS = 8192
# Tokens the benchmarks' chat prompts carry besides their notes: the template, system prompt,
# ticket line and question (SmolLM2's tokenizer; measured on the benchmarks' prompts).
CHAT_OVERHEAD_TOKENS = 40


class Lengths(Protocol):
    """Anything that draws (prompt, output) token counts: a `LengthMix`, a replayed trace."""

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True, slots=True)
class LengthMix:
    """Prompt and output lengths: log-normal (median, sigma), or a two-kind uniform mix."""

    name: str
    kind: str  # lognormal | mixed
    prompt: tuple[float, float]  # lognormal: (median, sigma); mixed: the short range
    output: tuple[float, float]
    long_prompt: tuple[int, int] = (0, 0)  # mixed only
    long_output: tuple[int, int] = (0, 0)
    long_fraction: float = 0.0

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """`n` (prompt, output) token counts."""
        if self.kind == "lognormal":
            p = rng.lognormal(np.log(self.prompt[0]), self.prompt[1], n)
            o = rng.lognormal(np.log(self.output[0]), self.output[1], n)
            return (np.clip(np.rint(p), 1, MAX_TOKENS).astype(np.int64),
                    np.clip(np.rint(o), 1, MAX_TOKENS).astype(np.int64))
        long = np.zeros(n, dtype=bool)
        long[: round(self.long_fraction * n)] = True
        rng.shuffle(long)

        def uniform(short: tuple[float, float], lng: tuple[int, int]) -> np.ndarray:
            a = rng.integers(int(short[0]), int(short[1]) + 1, n)
            b = rng.integers(lng[0], lng[1] + 1, n)
            return np.where(long, b, a)

        prompts = uniform(self.prompt, self.long_prompt) + CHAT_OVERHEAD_TOKENS
        return prompts.astype(np.int64), uniform(self.output, self.long_output).astype(np.int64)

    def means(self) -> tuple[float, float]:
        """Mean prompt and output tokens (for first guesses of capacity)."""
        p, o = self.sample(4096, np.random.default_rng(0))
        return float(p.mean()), float(o.mean())


WORKLOADS: dict[str, LengthMix] = {
    "coding": LengthMix("coding", "lognormal", (1500, 0.8), (13, 1.0)),
    "conversation": LengthMix("conversation", "lognormal", (1020, 0.8), (129, 0.8)),
    "bench-pd": LengthMix("bench-pd", "mixed", (0, 100), (16, 48), (600, 1000), (64, 128), 0.3),
    "bench-serve": LengthMix("bench-serve", "mixed", (0, 100), (16, 48), (300, 600), (32, 64),
                             0.3),
}


def get_workload(name: str) -> LengthMix:
    if name not in WORKLOADS:
        raise ConfigError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)} or "
                          "give a trace file (--trace)")
    return WORKLOADS[name]


def poisson(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """`n` arrival times at `rate` per second, the first at 0."""
    gaps = rng.exponential(1.0 / rate, n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


@dataclass(frozen=True, slots=True)
class Trace:
    """Recorded arrivals (seconds from the first) and lengths."""

    arrivals: np.ndarray
    prompts: np.ndarray
    outputs: np.ndarray

    @property
    def rate(self) -> float:
        span = float(self.arrivals[-1] - self.arrivals[0])
        return (len(self.arrivals) - 1) / span if span > 0 else float("inf")


def load_trace(path: str | Path) -> Trace:
    """A Splitwise-style CSV or a JSONL trace; `ConfigError` naming what is missing."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"trace {p} does not exist")
    rows: list[tuple[float, int, int]] = []
    try:
        if p.suffix == ".csv":
            with p.open() as f:
                for row in csv.DictReader(f):
                    ts = row["TIMESTAMP"]
                    t = (datetime.fromisoformat(ts.strip()[:26]).timestamp()
                         if not _is_number(ts) else float(ts))
                    rows.append((t, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
        else:
            for line in p.read_text().splitlines():
                if line.strip():
                    d = json.loads(line)
                    rows.append((float(d["arrival_s"]), int(d["prompt_tokens"]),
                                 int(d["output_tokens"])))
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"trace {p}: bad or missing field {exc}; CSV needs TIMESTAMP, "
                          "ContextTokens, GeneratedTokens; JSONL needs arrival_s, "
                          "prompt_tokens, output_tokens") from exc
    if len(rows) < 2:
        raise ConfigError(f"trace {p} has fewer than two requests")
    rows.sort()
    a = np.array(rows, dtype=float)
    return Trace(a[:, 0] - a[0, 0], np.maximum(a[:, 1], 1).astype(np.int64),
                 np.maximum(a[:, 2], 1).astype(np.int64))


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True
