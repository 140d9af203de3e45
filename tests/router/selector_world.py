"""A synthetic serving world for selector tests: task families whose prompts differ in how much
they repeat themselves, and methods whose speed depends on it the way prompt lookup's does.

`speed(method, features, load)` is the world's truth; `records(...)` are the performance records
a router would have written serving it. Families differ in their token vocabularies, so their
task signatures differ: a held-out family is new to the selector in every way but its features.
"""

from __future__ import annotations

import math
import random

from baton.records import PerfRecord
from baton.router.features import RequestFeatures, request_features
from baton.router.speed_model import load_features

BASE_TPS = 20.0


def prompt(family: int, copying: float, rng: random.Random, length: int = 160) -> list[int]:
    """Tokens of one request: the family's instruction, then content of which `copying` repeats
    an earlier stretch of the prompt."""
    vocab = range(1000 * (family + 1), 1000 * (family + 1) + 400)
    template = random.Random(family)
    out = [template.choice(vocab) for _ in range(100)]
    while len(out) < length:
        if rng.random() < copying:
            start = rng.randrange(0, len(out) - 8)
            out.extend(out[start:start + 8])
        else:
            out.extend(rng.choice(vocab) for _ in range(8))
    return out[:length]


def features(family: int, copying: float, rng: random.Random) -> RequestFeatures:
    return request_features(prompt(family, copying, rng), 64, 0.0, 1.0)


def speed(method: str, f: RequestFeatures, in_flight: float = 0.0) -> float:
    """Decode tokens/s in this world: lookup pays with repetition, less so under load; int8 is
    always faster."""
    gain = {"none": 0.0, "ngram": 2.5 * f.lookup_hit_rate - 0.25,
            "int8": 0.4}[method]
    gain /= 1 + in_flight
    return BASE_TPS * math.exp(gain)


def record(method: str, f: RequestFeatures, tps: float, pool: str = "default",
           quantization: str | None = None, in_flight: float = 0.0) -> PerfRecord:
    return PerfRecord(method=method, prefill_path="local", pool=pool, quantization=quantization,
                      tpot_s=1 / tps, output_tokens=64, prompt_tokens=f.prompt_tokens,
                      features={**f.as_dict(), **load_features((in_flight, 0.0, 0.0))})


def records(families: list[int], per_family: int, methods: list[str], seed: int = 0,
            noise: float = 0.05) -> list[PerfRecord]:
    """Every method on every request of the families (copying spread over 0..0.9)."""
    rng = random.Random(seed)
    out = []
    for fam in families:
        for i in range(per_family):
            f = features(fam, 0.9 * i / max(per_family - 1, 1), rng)
            for m in methods:
                out.append(record(m, f, speed(m, f) * math.exp(rng.gauss(0, noise))))
    return out
