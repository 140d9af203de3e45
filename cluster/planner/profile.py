"""A measured profile of one engine on one machine: `baton profile` writes it, the planner reads it.

JSON: the device (`cpu` or a catalog GPU name), the model's transformers config, the engine's
dtype, threads and KV cache size, the KV link's measured bytes/s, and the timings: prefill seconds
per prompt length, decode step seconds per (batch size, context length per request). The timings
are of the engine alone; `serving_scale` is how many times longer a step takes in a serving worker
(its actor, Ray, the router and the KV link sharing the machine), `prefill_scale` how many times
longer again a prefill worker's step takes (its KV sender shares its core), `prompt_scale` how
many times longer another worker's step takes when it carries prompt tokens, `handoff_s` what
one KV handoff adds to a remote prefill's TTFT beyond moving its bytes (`handoff_busy_s` more
per sequence its decode worker holds, when it is stepping then) and `request_s` what the
serving path (API, router, actor calls) adds to every request's, all fitted to served
benchmarks by `baton bench plan --fit-on` (1.0, 1.0, 1.0, 0, 0 and 0 until then).
`host_contention`, fitted with them (0 until then), is how much the serving workers of one
machine slow each other: while one runs a prompt, the others decode at
`1 / (1 + host_contention)` of their speed. It applies where a benchmark is replayed on the
machine it ran on; `baton plan` gives each replica a machine of its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from baton.errors import ConfigError

# A gRPC KV link on loopback moved about this much on this machine (`baton bench kv`).
DEFAULT_CPU_LINK_BYTES_PER_S = 300e6


@dataclass(slots=True)
class Profile:
    """Timings of one engine; `prefill` is [(tokens, s)], `decode` is [(batch, context, s)]."""

    device: str
    model: str
    model_config: dict[str, Any]
    dtype: str = "bfloat16"
    threads: int = 1
    kv_cache_memory: float = float(1 << 30)
    kv_link_bytes_per_s: float = DEFAULT_CPU_LINK_BYTES_PER_S
    max_num_batched_tokens: int = 512
    prefill: list[tuple[int, float]] = field(default_factory=list)
    decode: list[tuple[int, int, float]] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    serving_scale: float = 1.0
    handoff_s: float = 0.0
    prefill_scale: float = 1.0
    request_s: float = 0.0
    handoff_busy_s: float = 0.0
    host_contention: float = 0.0
    prompt_scale: float = 1.0

    @property
    def is_cpu(self) -> bool:
        return self.device == "cpu" or self.device.startswith("cpu")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"profile {p} does not exist; measure one with `baton profile`")
        try:
            raw = json.loads(p.read_text())
            prof = cls(**raw)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"profile {p} is not a `baton profile` file: {exc}") from exc
        prof.prefill = [(int(n), float(s)) for n, s in prof.prefill]
        prof.decode = [(int(b), int(c), float(s)) for b, c, s in prof.decode]
        if len(prof.prefill) < 2 or len(prof.decode) < 2:
            raise ConfigError(f"profile {p} needs at least two prefill and two decode points")
        if not (prof.serving_scale > 0 and prof.prefill_scale > 0 and prof.prompt_scale > 0
                and min(prof.handoff_s, prof.handoff_busy_s, prof.request_s,
                        prof.host_contention) >= 0):
            raise ConfigError(f"profile {p}: serving_scale, prefill_scale and prompt_scale must "
                              f"be positive and handoff_s, handoff_busy_s, request_s and "
                              f"host_contention at least 0, not {prof.serving_scale!r}, "
                              f"{prof.prefill_scale!r}, {prof.prompt_scale!r}, "
                              f"{prof.handoff_s!r}, {prof.handoff_busy_s!r}, "
                              f"{prof.request_s!r} and {prof.host_contention!r}")
        return prof
