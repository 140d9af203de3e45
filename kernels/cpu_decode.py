"""Baton's C++ kernels for bf16 CPU decode steps (`cpu_decode.cpp`), built once per machine.

At one token a row, a decode step on the CPU is hundreds of small calls; three kinds cost far more
than the bytes they read, and Baton runs them itself:

- **Linears** (`skinny_linear`): oneDNN runs a bf16 linear at one row much slower than the weight
  can be read. This kernel (AVX-512 BF16 dot products, rows split over torch's threads) does the
  decode-sized calls instead, on a copy of the weight laid out at load (`pack_skinny`) so that
  each call reads it as one front-to-back stream.
- **Attention** (`decode_attention`): each query token of a decode or verify step (a token and
  its draft, chain or tree) over its sequence's paged keys and values, read in place (no gather),
  scores, softmax and sum in fp32, in one call per layer instead of about twenty-five small torch
  ops. One query at a 300-token context takes 16 us a layer here.
- **RMSNorm** (`rms_norm`, swapped in by `baton.actors.cpu_norm`): Llama's formula in one call
  instead of eight; about 2 ms of a 35 ms batch-1 forward here.

Linears, measured on an AMD EPYC with avx512_bf16, 2 threads, weights hot in cache (us per call,
oneDNN packed -> this kernel):

| weight [N, K] | 1 row | 4 rows | 8 rows | 17 rows |
| --- | --- | --- | --- | --- |
| 192 x 576 (k/v) | 38 -> 5 | 33 -> 8 | 29 -> 12 | 45 -> 33 |
| 576 x 576 (q/o) | 44 -> 18 | 30 -> 19 | 40 -> 26 | 63 -> 80 |
| 576 x 1536 (down) | 42 -> 24 | 45 -> 31 | 87 -> 61 | 126 -> 188 |
| 3072 x 576 (gate+up) | 67 -> 70 | 71 -> 72 | 104 -> 127 | 194 -> 345 |
| 49152 x 576 (LM head) | 3083 -> 3281 | 2779 -> 4600 | 3402 -> 3865 | 4366 -> 6750 |

So it takes calls of up to `MAX_ROWS` rows on weights of up to `MAX_WEIGHT_ELEMENTS`, and
oneDNN keeps the rest (prompt chunks, long verify runs, the LM head).

A batch-1 decode forward of the default model at a 300-token context, medians of six interleaved
rounds in one run here: 45.6 ms on oneDNN and torch's attention path, 38.4 ms with the linears on
this kernel, 32.0 ms with both (1.43x).

They are compiled with the machine's C++ compiler through `torch.utils.cpp_extension` (about 30 s,
once, by `baton prepare-model`; cached under `TORCH_EXTENSIONS_DIR`, else
`~/.cache/torch_extensions/baton_cpu`). They are used only where the CPU has avx512_bf16, and
`BATON_CPU_KERNELS=0` turns them off. Where they cannot be built, oneDNN and the torch path run
everything (logged once).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
MAX_ROWS = 8
MAX_WEIGHT_ELEMENTS = 1 << 21  # 4 MiB of bf16: every projection of a small model, no LM head


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def wanted() -> bool:
    """Whether this machine should run the kernels: a CPU with avx512_bf16, and not turned off."""
    return os.environ.get("BATON_CPU_KERNELS", "1") != "0" and "avx512_bf16" in cpu_flags()


# A build takes about 30 s here; a lock older than this was left by a process killed mid-build.
STALE_LOCK_SECONDS = 120.0


def build_root() -> Path:
    """Where builds go: `TORCH_EXTENSIONS_DIR`, else torch's default root for CPU builds."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path(get_default_build_root()) / "baton_cpu"


def wait_for_build(build_dir: Path, poll: float = 0.5) -> None:
    """Wait while another process builds here; remove its lock once it is stale. (torch waits for
    a lock to go, forever: one left by a process killed while building would hang every later
    engine on this machine.)"""
    lock = build_dir / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_LOCK_SECONDS:
            log.warning("removing a stale build lock (%.0f s old) at %s", age, lock)
            lock.unlink(missing_ok=True)
            return
        time.sleep(poll)


@functools.cache
def kernel() -> ModuleType | None:
    """The built extension, or None where it is off, unsupported or fails to build."""
    if not wanted():
        log.info("CPU decode kernels off (BATON_CPU_KERNELS=0) or no avx512_bf16 on this CPU: "
                 "the decode step stays on oneDNN and torch")
        return None
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # torch runs `ninja` from PATH: the pip package's own
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    try:
        # Named by the source's hash: two versions of Baton on one machine never load each
        # other's build.
        digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
        name = f"baton_cpu_decode_{digest}"
        build_dir = build_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        wait_for_build(build_dir)
        return load(name, [str(SOURCE)], extra_cflags=["-O3", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)
    except Exception as exc:  # no compiler, no ninja, a compiler without avx512bf16 ...
        log.warning("cannot build Baton's CPU decode kernels (%s); oneDNN and torch run the "
                    "decode step", exc)
        return None


def fits(weight: torch.Tensor) -> bool:
    """Whether decode-sized calls on `weight [N, K]` go to this kernel (see the table above)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and weight.dim() == 2 and weight.shape[1] % 32 == 0
            and weight.numel() <= MAX_WEIGHT_ELEMENTS and kernel() is not None)


def takes_decode_attention(query: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether `decode_attention` can attend these bf16 CPU queries `[T, H, D]` over this cache
    `[Hkv, N, bs, D]` (at most 16 query heads per kv head, D a multiple of 16 up to 256)."""
    _, n_heads, d = query.shape
    n_kv = cache.shape[0]
    return (query.device.type == "cpu" and query.dtype == torch.bfloat16
            and cache.dtype == torch.bfloat16 and n_heads % n_kv == 0
            and n_heads // n_kv <= 16 and d % 16 == 0 and d <= 256 and kernel() is not None)


def decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, rows: torch.Tensor, base: torch.Tensor,
                     bits: torch.Tensor, scale: float) -> torch.Tensor:
    """Query tokens `[T, H, D]` over their rows' paged keys and values, token t seeing row
    `rows[t]`'s first `base[t]` keys and, of the 32 after them, those set in `bits[t]` (see
    `attention_plans.TokenPlan`); fp32 inside, a two-pass softmax -> `[T, H, D]` bf16."""
    return _ext().decode_attention(query, k_cache, v_cache, block_tables, rows, base, bits,
                                   scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm of bf16 rows `x [..., H]` with a bf16 `weight [H]`, in one call."""
    return _ext().rms_norm(x, weight, eps)


SKINNY_BLOCK = 4  # weight rows per block of the packed layout (kRows in cpu_decode.cpp)


def pack_skinny(weight: torch.Tensor) -> torch.Tensor:
    """`weight [N, K]` (bf16, K a multiple of 32) laid out for `skinny_linear`: blocks of four
    rows with their 32-wide K chunks interleaved, `[ceil(N/4), K/32, 4, 32]`, rows past N zero."""
    n, k = weight.shape
    if k % 32:
        raise ValueError(f"the skinny kernel needs K to be a multiple of 32, got {k}")
    blocks = -(-n // SKINNY_BLOCK)
    padded = weight.new_zeros(blocks * SKINNY_BLOCK, k)
    padded[:n] = weight
    return padded.view(blocks, SKINNY_BLOCK, k // 32, 32).transpose(1, 2).contiguous()


def unpack_skinny(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The `[N, K]` weight `pack_skinny` laid out (a copy)."""
    blocks, chunks = packed.shape[:2]
    return packed.transpose(1, 2).reshape(blocks * SKINNY_BLOCK, chunks * 32)[:out_features]


def skinny_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for bf16 `x [..., K]` with few rows, fp32 accumulation, on
    `packed = pack_skinny(weight)`."""
    return _ext().skinny_linear(x, packed, out_features, bias)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' `apply_rotary_pos_emb` for one of q, k: bf16 `x [T, H, D]` with the step's
    `cos`, `sin` (`[1, T, D]` or `[T, D]`), bit for bit, in one call."""
    return _ext().rope(x, cos, sin)


def _ext() -> ModuleType:
    ext = kernel()
    if ext is None:
        raise RuntimeError("Baton's CPU decode kernel is not available on this machine")
    return ext
