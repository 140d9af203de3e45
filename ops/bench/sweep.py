"""The open-loop rate sweep `baton bench pd` and `baton bench serve` share.

A mixed chat workload (short questions; a share of prompts with notes to read and longer answers)
runs as Poisson arrivals at rising rates, the systems under test taking turns at each rate; a
system leaves after its first rate below `ATTAINMENT`. Before that each system is warmed up, and
the unloaded TTFT and TPOT (a longest-kind prompt alone) are measured to set the SLOs from.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table

from baton.errors import ConfigError
from baton.ops.bench.openloop import SLO, goodput, poisson_arrivals, run_record
from baton.ops.bench.workload import QUESTIONS, BenchRequest, RequestTiming, chat_prompt_ids

ATTAINMENT = 0.9
CALIBRATION_TOKENS = 32

Results = dict[str, dict[float, dict[str, Any]]]  # system -> rate -> that run's record


class LoadedSystem(Protocol):
    """A system under open-loop load."""

    name: str

    def run(self, requests: Sequence[BenchRequest],
            arrivals: Sequence[float]) -> tuple[list[RequestTiming], float]:
        """Send `requests` at their `arrivals` (offsets in s); (timings in order, wall s)."""
        ...

    def notes(self) -> dict[str, Any]:
        """What the last run's record should add (e.g. requests cut at their SLO deadline)."""
        ...


@dataclass(frozen=True, slots=True)
class MixedLoad:
    """Chat traffic: short questions and, `long_fraction` of them, prompts with notes to read.

    Ranges are inclusive (prompt tokens, output tokens); outputs are exact (EOS ignored)."""

    long_prompt: tuple[int, int]
    long_output: tuple[int, int]
    short_prompt: tuple[int, int] = (0, 100)
    short_output: tuple[int, int] = (16, 48)
    long_fraction: float = 0.3

    def requests(self, tokenizer: Any, n: int, seed: int) -> list[BenchRequest]:
        """`n` requests, `long_fraction` of them (rounded) long, in shuffled order; each opens
        with its own ticket line, so no two share a cached prefix past the system prompt.

        The long share is fixed, not drawn, so that every rate brings the same kind of work."""
        rng = random.Random(seed)
        num_long = round(self.long_fraction * n)
        kinds = [True] * num_long + [False] * (n - num_long)
        rng.shuffle(kinds)
        out = []
        for i, long in enumerate(kinds):
            prompt, output = ((self.long_prompt, self.long_output) if long
                              else (self.short_prompt, self.short_output))
            ids = chat_prompt_ids(tokenizer, rng.choice(QUESTIONS), rng.randint(*prompt), rng,
                                  header=f"Ticket {seed}-{i}.\n")
            out.append(BenchRequest(ids, rng.randint(*output)))
        return out

    def describe(self, num_requests: int) -> dict[str, Any]:
        """The report's account of the workload (a benchmark adds what is its own)."""
        return {
            "num_requests_per_rate": num_requests, "long_fraction": self.long_fraction,
            "long": {"prompt_tokens": self.long_prompt, "output_tokens": self.long_output},
            "short": {"prompt_tokens": self.short_prompt, "output_tokens": self.short_output},
            "arrivals": "Poisson, the same schedule for every system", "ignore_eos": True,
            "sampling": "greedy",
        }


def check_args(num_requests: int, rates: Sequence[float], ttft_scale: float,
               tpot_scale: float) -> None:
    if num_requests < 1 or not rates or min(rates) <= 0 or ttft_scale <= 0 or tpot_scale <= 0:
        raise ConfigError("--num-requests, --rate and the SLO scales must all be positive")


def probes(tokenizer: Any, tag: str, n: int, prompt_tokens: int, max_tokens: int,
           seed: int) -> list[BenchRequest]:
    """`n` chat prompts that share no cached prefix with the workload or each other."""
    rng = random.Random(f"{tag}-{seed}")
    return [BenchRequest(chat_prompt_ids(tokenizer, rng.choice(QUESTIONS), prompt_tokens, rng,
                                         header=f"{tag} {seed}-{i}.\n"), max_tokens)
            for i in range(n)]


def warm(system: LoadedSystem, tokenizer: Any, load: MixedLoad, seed: int) -> None:
    """Two longest-kind and two short prompts through `system`'s own paths."""
    system.run([*probes(tokenizer, f"Warm-up {system.name}", 2, load.long_prompt[1], 4, seed),
                *probes(tokenizer, f"Warm-up {system.name} short", 2, 0, 4, seed)],
               [0.0, 0.0, 0.1, 0.1])


def calibrate(system: LoadedSystem, tokenizer: Any, load: MixedLoad,
              seed: int) -> tuple[float, float]:
    """(TTFT, TPOT) unloaded: the best of three fresh longest-kind prompts, each alone."""
    best_ttft, best_tpot = float("inf"), float("inf")
    for probe in probes(tokenizer, f"Calibration {system.name}", 3, load.long_prompt[1],
                        CALIBRATION_TOKENS, seed):
        (t,), _ = system.run([probe], [0.0])
        best_ttft, best_tpot = min(best_ttft, t.ttft), min(best_tpot, t.tpot or best_tpot)
    return best_ttft, best_tpot


def run(systems: Mapping[str, LoadedSystem], tokenizer: Any, load: MixedLoad,
          num_requests: int, rates: Sequence[float], slo: SLO, seed: int,
          say: Callable[[str], Any]) -> Results:
    """Each rate gets fresh requests (an earlier rate's prompt would hit the prefix cache), the
    same for every system, on one arrival schedule; a system leaves after a rate it missed."""
    results: Results = {name: {} for name in systems}
    live = list(systems)
    for k, rate in enumerate(sorted(rates)):
        requests = load.requests(tokenizer, num_requests, seed + 1000 * (k + 1))
        arrivals = poisson_arrivals(len(requests), rate, seed + k)
        for name in live if k % 2 == 0 else live[::-1]:  # take turns going first
            results[name][rate] = _run_at(name, systems[name], requests, arrivals, rate, slo,
                                          load, say)
        live = [n for n in live if results[n][rate]["attainment"] >= ATTAINMENT]
        if not live:
            break
    return results


def extend_down(systems: Mapping[str, LoadedSystem], results: Results, tokenizer: Any,
                load: MixedLoad, num_requests: int, slo: SLO, seed: int,
                say: Callable[[str], Any], min_rate: float) -> None:
    """For each system that missed the SLOs at the lowest rate swept, halve the rate (fresh
    requests each time) until it meets them or would go below `min_rate`; its goodput is then
    the rate it met rather than 0. Adds the runs to `results`."""
    for name, system in systems.items():
        rate = min(results[name])
        k = 0
        while results[name][rate]["attainment"] < ATTAINMENT and rate / 2 >= min_rate:
            rate, k = rate / 2, k + 1
            requests = load.requests(tokenizer, num_requests, seed - 1000 * k)
            arrivals = poisson_arrivals(len(requests), rate, seed - k)
            results[name][rate] = _run_at(name, system, requests, arrivals, rate, slo, load,
                                          say)


def _run_at(name: str, system: LoadedSystem, requests: Sequence[BenchRequest],
            arrivals: Sequence[float], rate: float, slo: SLO, load: MixedLoad,
            say: Callable[[str], Any]) -> dict[str, Any]:
    """One system's run at one rate, as the report keeps it."""
    timings, wall = system.run(requests, arrivals)
    s = run_record(timings, wall, slo, requests, load.long_prompt[0])
    s["arrivals"] = list(arrivals)  # offsets in s: with the lengths, enough to replay the run
    notes = system.notes()
    s.update(notes)
    say(f"{name:>18} @ {rate:.2f} req/s: attainment {s['attainment']:.0%}, TTFT p99 "
        f"{s['ttft_p99_s']:.2f} s, TPOT p99 {_ms(s['tpot_p99_s'])} ms"
        + "".join(f", {k} {v}" for k, v in notes.items() if not isinstance(v, list)))
    return s


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None where either is missing or b is 0."""
    return a / b if a is not None and b else None


def systems_report(results: Results) -> dict[str, dict[str, Any]]:
    """Each system's goodput and its run at every rate, as the report keeps them."""
    swept = max(r for by_rate in results.values() for r in by_rate)
    out = {}
    for name, by_rate in results.items():
        good = goodput(by_rate, ATTAINMENT)
        out[name] = {"goodput_rps": good,
                     # Met the SLOs at the highest rate swept: goodput is a lower bound.
                     "goodput_is_lower_bound": good == swept,
                     "rates": {str(r): s for r, s in sorted(by_rate.items())}}
    return out


def slo_report(slo: SLO, scales: tuple[float, float],
               solo: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    """The SLOs, what they were set from, and the attainment goodput asks for."""
    return {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "attainment": ATTAINMENT,
            "ttft_scale": scales[0], "tpot_scale": scales[1],
            "solo": {n: {"ttft_s": t, "tpot_s": p} for n, (t, p) in solo.items()}}


def print_table(report: dict[str, Any], console: Console, bench: str) -> None:
    """The per-rate table, each system's goodput and the scalar ratios (with their targets)."""
    slo = report["slo"]
    table = Table(title=f"baton bench {bench}: {report['model']} {report['dtype']}, "
                        f"SLO TTFT {slo['ttft_s']:.2f} s / TPOT {slo['tpot_s'] * 1000:.0f} ms",
                  caption="TTFT in s, TPOT in ms")
    for col in ("system", "req/s", "attain", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
                "tok/s"):
        table.add_column(col, justify="left" if col == "system" else "right",
                         min_width=18 if col == "system" else None)
    for name, system in report["systems"].items():
        for rate, s in system["rates"].items():
            table.add_row(name, rate, f"{s['attainment']:.0%}", f"{s['ttft_p50_s']:.2f}",
                          f"{s['ttft_p99_s']:.2f}", _ms(s["tpot_p50_s"]), _ms(s["tpot_p99_s"]),
                          f"{s['output_tok_s']:.1f}")
    console.print(table)
    for name, system in report["systems"].items():
        at_least = "at least " if system["goodput_is_lower_bound"] else ""
        console.print(f"goodput {name}: {at_least}{system['goodput_rps']:.2f} req/s")
    targets = report.get("targets", {})
    for name, value in report["ratios"].items():
        if not isinstance(value, dict):
            shown = "-" if value is None else f"{value:.2f}"
            target = targets.get(name)
            console.print(f"{name}: {shown}" + (f" (target {target})" if target else ""))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"
