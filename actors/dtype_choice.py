"""The engine's dtype when the user leaves it unset (`dtype="auto"`): the fastest on this machine.

On CUDA: bfloat16 where the GPU has it, else float16. On a CPU the answer depends on the chip: with
avx512_bf16 (and Baton's kernels) or AMX, bfloat16 reads half the bytes of float32 at full speed;
without them oneDNN emulates bf16 and float32 wins; float16 is fast only where the CPU has
AVX512-FP16 or AMX-FP16. So each candidate is timed once, the way the engine would run it (the
same linear layers: oneDNN-packed and the skinny kernel for bf16 / fp16, plain for fp32), on
weights larger than the caches:

- decode: one token row through the layers (memory-bound; most of a generation's time);
- prefill: a 64-row chunk through them (compute-bound).

The choice is the fastest decode among the candidates whose prefill is within `PREFILL_SLACK` of
the fastest prefill (a dtype that decodes fast but prefills 3x slower would cost more TTFT than
it saves). It is kept in `BATON_CACHE/cpu_dtype.json` under the CPU's model and flags, torch's
version and the thread count, so a machine measures once (under a second).

Prefill and decode pools that resolve different dtypes cannot hand KV over (the link checks the
dtype, and the decode worker then prefills locally): across machine types, set the pools' dtype.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from baton.actors.cpu_linear import PackedLinear, packing_supported
from baton.actors.model_source import cache_root
from baton.kernels import cpu_decode

log = logging.getLogger(__name__)

AUTO = "auto"
CACHE_FILE = "cpu_dtype.json"
PREFILL_SLACK = 2.0
SHAPE = (2816, 1024)  # [N, K] of each timed layer: an MLP projection of a 1B-class model
LAYERS = 8  # 92 MB of float32, 46 of bf16: past the caches
PREFILL_ROWS = 64
RUNS = 3
NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def resolve(name: str, device: torch.device, threads: int | None = None) -> torch.dtype:
    """The torch dtype for a config's `dtype` (`AUTO`: this machine's fastest, see above)."""
    if name != AUTO:
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, cpu_choice(threads or torch.get_num_threads()))


def candidates() -> list[torch.dtype]:
    """The dtypes worth timing on this CPU: float32 always, bf16 and fp16 where oneDNN packs
    them (it says whether the CPU runs them natively), bf16 also where Baton's kernels run."""
    found = [torch.float32]
    cpu = torch.device("cpu")
    if packing_supported(torch.bfloat16, cpu) or cpu_decode.wanted():
        found.append(torch.bfloat16)
    if packing_supported(torch.float16, cpu):
        found.append(torch.float16)
    return found


def machine_key(threads: int) -> str:
    flags = sorted(f for f in cpu_decode.cpu_flags()
                   if f.startswith(("avx512", "amx", "avx2", "fma", "f16c")))
    return "|".join([_cpu_model(), " ".join(flags), f"torch {torch.__version__}",
                     f"threads {threads}", f"kernels {int(cpu_decode.wanted())}"])


@functools.cache
def cpu_choice(threads: int) -> str:
    """This CPU's dtype name for `threads` threads: cached on disk, else measured and saved."""
    path = cache_root() / CACHE_FILE
    key = machine_key(threads)
    saved = _read(path)
    if key in saved and saved[key].get("choice") in NAMES.values():
        return saved[key]["choice"]
    timings = measure(threads)
    choice = choose(timings)
    log.info("dtype auto on this CPU (%d threads): %s (decode / prefill ms: %s)", threads, choice,
             {n: (round(d * 1e3, 2), round(p * 1e3, 1)) for n, (d, p) in timings.items()})
    saved[key] = {"choice": choice, "decode_s": {n: t[0] for n, t in timings.items()},
                  "prefill_s": {n: t[1] for n, t in timings.items()}}
    _write(path, saved)
    return choice


def choose(timings: dict[str, tuple[float, float]]) -> str:
    """The dtype with the fastest decode among those whose prefill is within `PREFILL_SLACK` of
    the fastest; `timings` maps a dtype name to its (decode, prefill) seconds."""
    best_prefill = min(p for _, p in timings.values())
    fair = {n: d for n, (d, p) in timings.items() if p <= best_prefill * PREFILL_SLACK}
    return min(fair, key=lambda n: fair[n])


def measure(threads: int) -> dict[str, tuple[float, float]]:
    """(decode, prefill) seconds of each candidate dtype through `LAYERS` layers, best of
    `RUNS`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        n, k = SHAPE
        weights = [torch.randn(n, k, generator=gen) * k**-0.5 for _ in range(LAYERS)]
        rows = {1: torch.randn(1, k, generator=gen),
                PREFILL_ROWS: torch.randn(PREFILL_ROWS, k, generator=gen)}
        timings = {}
        for dtype in candidates():
            layers = [_layer(w, dtype) for w in weights]
            with torch.inference_mode():
                decode, prefill = (_best(layers, x.to(dtype)) for x in rows.values())
            timings[NAMES[dtype]] = (decode, prefill)
        return timings
    finally:
        torch.set_num_threads(previous)


def _layer(weight: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    linear = linear.to(dtype)
    return PackedLinear(linear) if packing_supported(dtype, torch.device("cpu")) else linear


def _best(layers: list[nn.Module], x: torch.Tensor) -> float:
    for layer in layers:  # first calls pay for allocation
        layer(x)
    best = float("inf")
    for _ in range(RUNS):
        t0 = time.perf_counter()
        for layer in layers:
            layer(x)
        best = min(best, time.perf_counter() - t0)
    return best


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:  # a read-only cache: measure again next time
        log.warning("cannot keep the dtype choice in %s (%s)", path, exc)
