"""Baton's C++ kernels for bf16 CPU decode steps (`cpu_decode.cpp`, `cpu_matmul.cpp`), built once
per machine.

At one token a row, a decode step on the CPU is hundreds of small calls; four kinds cost far more
than the bytes they read, and Baton runs them itself:

- **Linears** (`skinny_linear`): oneDNN runs a bf16 linear at one row much slower than the weight
  can be read. This kernel (AVX-512 BF16 dot products, rows split over torch's threads) does the
  decode-sized calls instead, on a copy of the weight laid out at load (`pack_skinny`: blocks of
  48 rows, each pair of K of the 48 side by side) so that each call reads it as one front-to-back
  stream, and a vector's lanes are 16 output rows, so a verify step's rows share each weight
  vector read.
- **Weight-only int8 and int4 linears** (`skinny_linear_int8`, `skinny_linear_int4`): the same
  for quantized layers of bf16 models, weights widened to bf16 in registers. The int4 kernel
  turns each vector's lanes to 16 output rows (see `cpu_matmul_int4.cpp`), so a group's scale
  costs one multiply per 16 rows and group. Over the default model's 210 projections, cold in
  cache, two threads, one token row: int4 2.7 ms against 3.8 for int8 and 3.9 for PyTorch's
  packed int4 kernel; eight rows 5.7 against 12.7 and 11.5; 512 rows (a prompt chunk) 0.30 s
  against 0.44 and 0.51.
- **Attention** (`decode_attention`): the query tokens of a decode or verify step (a token and
  its draft, chain or tree) over their sequences' paged keys and values, read in place (no
  gather), in one call per layer instead of about twenty-five small torch ops. The work goes in
  tiles of up to sixteen query vectors of one sequence and one kv head (`cpu_attention.cpp`): a
  verify run's tokens times the kv head's query heads share one read of the keys and values, and
  the products run as bf16 pairs summed in fp32 (VDPBF16PS): scores with sixteen keys as the
  lanes, P x V with the weights in bf16 as GPU paged-attention kernels multiply them. Each
  query's output depends on its own query, keys and mask alone, so a verify run's tokens come
  out bit for bit as decode tokens would. The default model's shapes (9 query and 3 kv heads,
  head dim 64), 30 layers, 2 threads, an AMD EPYC without AMX, ms; the kernel it replaced (each
  token and kv head alone, fp32 products of widened keys and values) -> this one, medians of
  two to five runs each, alternated processes:

  | keys | 1 token | 8-token run | 16-token run | 16 sequences x 1 token |
  | --- | --- | --- | --- | --- |
  | 150 | 0.22 -> 0.21 | 0.88 -> 0.57 | 1.78 -> 1.11 | 1.84 -> 1.95 |
  | 600 | 0.58 -> 0.55 | 3.12 -> 1.85 | 6.22 -> 3.47 | 7.73 -> 7.77 |
  | 1500 | 1.40 -> 1.38 | 7.95 -> 5.04 | 15.6 -> 8.6 | 25.9 -> 27.0 |

  (The 16-sequence column moved by up to a fifth between runs of either kernel.) A draft tree's
  tokens share tiles too, each reading its own path past the keys before the draft: an 8-token
  tree (two branches) took 0.66, 1.90 and 4.40 ms at 150, 600 and 1,500 keys, about what the
  8-token chain takes, where the kernel it replaced took any 8 tokens as the chain's column
  above. `baton bench kernels` times these cases on any CPU with the kernels, against torch's
  SDPA on the same keys laid out contiguously.

  **With AMX** (and a head dim that is a multiple of 32 up to 128) the same tiles run on the
  tile unit instead (`cpu_attention_amx.cpp`). On a Xeon with AMX, the kernel that the AVX-512
  one above replaced -> AMX, same shapes, ms:

  | keys | 1 token | 8-token run | 16-token run | 16 sequences x 1 token |
  | --- | --- | --- | --- | --- |
  | 150 | 0.48 -> 0.49 | 1.81 -> 0.98 | 3.23 -> 1.66 | 4.04 -> 4.70 |
  | 600 | 1.04 -> 1.06 | 8.95 -> 3.15 | 18.3 -> 5.33 | 19.2 -> 19.4 |

- **RMSNorm** (`rms_norm`, swapped in by `baton.actors.cpu_norm`): Llama's formula in one call
  instead of eight; about 2 ms of a 35 ms batch-1 forward here.
- **Rotary embedding** (`rope`, for `baton.actors.cpu_step`): transformers' formula, bit for bit,
  in one call instead of about a dozen.
- **SiLU times up, residual adds** (`silu_mul`, `add_bf16`, inside the fused layer): ATen's bits
  without ATen's per-call cost, which grows with a verify step's rows.
- **Logits rows** (`argmax_rows`, `top_logprobs`, through `baton.kernels.cpu_logits`): greedy
  tokens as torch.argmax picks them and Medusa's candidates, vectorized.

The layout is what lets a decode step read its weights at the memory's speed. The default
model's 210 projections (212 MB, far past the caches), one row each, measured in one process on
an AMD EPYC with avx512_bf16: 10.0 GB/s on one thread with the plain `[N, K]` weight (four rows
read side by side, four short interleaved streams), 18.6 GB/s laid out in blocks (`torch.sum`
reads 19.9); on two threads 15.7 against 26.3 (`torch.sum` 31.6). Software prefetching ahead of
the stream only slowed it (to 10-12 GB/s at 1 KiB ahead): the hardware prefetcher follows one
stream best.

Rows past the first cost dot products, not reads, so the lanes decide what a verify step costs.
The layout before this one (blocks of four rows with K in the lanes: one horizontal sum per
output, four token rows a pass) made eight rows cost 1.3-1.9 times one row in a whole decode
step here; lanes of output rows take eight token rows a pass with no horizontal sums. Linears,
2 threads, an AMD EPYC without AMX, weights hot in cache, us per call, oneDNN packed / blocks of
four / this layout:

| weight [N, K] | 1 row | 4 rows | 8 rows | 16 rows | 32 rows |
| --- | --- | --- | --- | --- | --- |
| 192 x 576 (k/v) | 18/4/4 | 18/6/5 | 21/8/7 | 27/14/10 | 37/26/18 |
| 576 x 576 (q/o) | 21/7/6 | 24/12/9 | 31/20/15 | 45/38/26 | 71/72/50 |
| 960 x 576 (q+k+v) | 25/10/8 | 29/18/13 | 41/32/23 | 62/61/43 | 107/120/83 |
| 576 x 1536 (down) | 32/14/13 | 38/23/19 | 56/43/35 | 90/80/66 | 160/164/129 |
| 3072 x 576 (gate+up) | 46/28/24 | 56/52/36 | 91/97/68 | 154/189/132 | 288/378/264 |

The default model's 210 projections cold in cache (the three kernels alternated in one process,
medians of 9, ms): 16.6 / 8.7 / 8.0 at one row, 13.6 / 9.7 / 7.5 at eight, 16.6 / 18.3 / 11.2 at
16, 24.2 / 29.3 / 18.5 at 32. The LM head (56 MB) is read from memory on every call, so hot in
cache is not how a step meets it. With 128 MB written between calls (medians of 21, ms): 2.20 /
1.59 / 1.77 at one row, 1.82 / 1.93 / 1.54 at four, 2.41 / 2.43 / 1.65 at eight, 3.26 / 5.23 /
2.85 at 16. At one row the head is a tenth slower than on blocks of four (software prefetching
made it slower still); the projections gain more than it loses.

So it takes calls of up to `MAX_ROWS` (32) rows on every weight, and oneDNN keeps the rest
(prompt chunks). Each output is one chain of dot products over K in order, whatever rows share
the call, so up to `MAX_ROWS` rows a verify step's logits, LM head included, have the bits a
decode step's would; oneDNN sums in another order.

**With AMX** (Intel's tile unit: amx_bf16 and amx_tile in the CPU flags, and Linux granting the
tile state), `skinny_linear` runs every call of up to `amx_rows()` (32) rows on the tiles instead
(cpu_matmul_amx.cpp), on every weight the LM head included, laid out there in blocks of four rows
with their 32-wide K chunks interleaved (`[N/4, K/32, 4, 32]`), as the tile kernel reads them. A
tile multiply does 16 x 16 x 32 products at once, so rows stop costing dot products and a call
reads its weight once at the memory's speed. The default model's 210 projections, cold in cache,
2 threads, a Xeon with AMX, ms per pass (AVX-512 kernel: the same build with `BATON_CPU_AMX=0`,
another process; measured with the blocks of four rows, before the lanes layout):

| rows | 1 | 8 | 16 | 32 |
| --- | --- | --- | --- | --- |
| AMX | 13.2 | 13.8 | 14.0 | 21.2 |
| AVX-512 kernel | 15.9 | 24.0 | 41.4 | - |
| oneDNN (packed, AMX) | 39.0 | 31.6 | 36.9 | 36.6 |

(Best of nine passes; oneDNN's row from the AMX process. The same processes gave oneDNN 28-30
ms where AMX was off: this machine's memory speed moves by a quarter between runs.)

Each output's sum runs the same tile operations whatever rows share the call, so a row's bits do
not depend on its batch up to 32 rows: a verify step's rows come out as decode rows would.

`skinny_linear_int8` runs every call on the tiles there too, 32 rows at a time, its int8 weights
widened to bf16 (exactly) as they are copied into the tiles and scaled per row at the end. The
widening, not the bytes read, sets its pace, so it runs about as fast as bf16 rather than twice
as fast; over the AVX-512 int8 kernel (same passes as above, ms, two runs each): 11.3-11.6 against
10.8-12.3 at one row, 14.3 against 42.2 at 8, 16.0 against 80.4 at 16, 79 against 638 at 128.

They are compiled with the machine's C++ compiler through `torch.utils.cpp_extension` (about a
minute on 2 cores, once per checkout and environment, by `baton prepare-model`; cached under
`TORCH_EXTENSIONS_DIR`, else `~/.cache/torch_extensions/baton_cpu`). They are used only where
the CPU has avx512_bf16, and `BATON_CPU_KERNELS=0` turns them off. Where they cannot be built,
oneDNN and the torch path run everything (logged once).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

# The extension's sources: the Python module and the norm and rotary kernels; attention's tiles
# and their AVX-512 kernel; attention on AMX tiles; the skinny matmuls (bf16 and int8; int4); a
# whole decoder layer in one call; reductions over logits rows; what they declare of each other.
SOURCES = tuple(Path(__file__).with_name(n) for n in ("cpu_decode.cpp", "cpu_attention.cpp",
                                                      "cpu_attention_amx.cpp",
                                                      "cpu_matmul.cpp", "cpu_matmul_amx.cpp",
                                                      "cpu_matmul_int4.cpp", "cpu_layer.cpp",
                                                      "cpu_logits.cpp", "cpu_decode.h"))
MAX_ROWS = 32  # rows of the calls it takes without AMX


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


# A build takes 65-80 s here, longer under load; a lock older than this was left by a process
# killed mid-build.
STALE_LOCK_SECONDS = 600.0


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

    _use_one_ninja()
    try:
        # Named by the sources' hash, where they are and the torch they build against: two
        # versions of Baton, or two checkouts or environments of one, never load or rebuild each
        # other's build (each other's paths in the build file would make ninja start over).
        where = f"{SOURCES[0].parent}|{Path(torch.__file__).parent}".encode()
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + where).hexdigest()[:12]
        name = f"baton_cpu_decode_{digest}"
        build_dir = build_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        wait_for_build(build_dir)
        return load(name, [str(p) for p in SOURCES if p.suffix == ".cpp"],
                    extra_cflags=["-O3", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)
    except Exception as exc:  # no compiler, no ninja, a compiler without avx512bf16 ...
        log.warning("cannot build Baton's CPU decode kernels (%s); oneDNN and torch run the "
                    "decode step", exc)
        return None


def _use_one_ninja() -> None:
    """Put the `ninja` package's binary (a dependency) first on PATH, which torch runs it from.
    Processes of one machine can see different ninjas (a system one, the environment's); ninja
    1.12 changed how it hashes build commands, so a build made by one looks stale to the other
    and every switch rebuilt the kernels from scratch (over a minute)."""
    try:
        import ninja
    except ImportError:
        return
    # A folder holding that one binary, so that nothing else on PATH changes.
    own = Path(ninja.BIN_DIR) / "ninja"
    if not own.exists():
        return
    folder = build_root() / f"ninja-{hashlib.sha256(str(own).encode()).hexdigest()[:12]}"
    link = folder / "ninja"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            tmp = folder / f"ninja.{os.getpid()}"
            tmp.symlink_to(own)
            tmp.replace(link)
    except OSError as exc:
        log.warning("cannot pin the ninja that builds the kernels (%s)", exc)
        return
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep, 1)[0] != str(folder):
        os.environ["PATH"] = str(folder) + os.pathsep + path


def amx_rows() -> int:
    """Up to how many rows `skinny_linear` runs on AMX tiles here (0: no AMX, or
    `BATON_CPU_AMX=0`, or the kernels are off)."""
    ext = kernel()
    return int(ext.amx_max_rows) if ext is not None and ext.amx_ready() else 0


def attention_on_amx(head_dim: int) -> bool:
    """Whether `decode_attention` runs on AMX tiles for this head dim (a multiple of 32 up to
    128, on a CPU with AMX, not turned off)."""
    return amx_rows() > 0 and head_dim % 32 == 0 and head_dim <= 128


def skinny_rows(weight: torch.Tensor) -> int:
    """Up to how many rows calls on `weight [N, K]` go to this kernel (0: none; see the tables
    above): with AMX, `amx_rows()`; else `MAX_ROWS`."""
    if not (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and weight.dim() == 2 and weight.shape[1] % 32 == 0 and kernel() is not None):
        return 0
    return amx_rows() or MAX_ROWS


def takes_int8(weight: torch.Tensor) -> bool:
    """Whether a weight-only int8 layer built from this `[N, K]` weight should run on
    `skinny_linear_int8`: a bf16 CPU weight, K a multiple of 64, and the kernels built. Over the
    default model's projections (cold in cache, one thread) it took 5.2 ms for one token row
    against 9.2 for PyTorch's int8 kernel and 8.4 for bf16 on the skinny kernel, and 13.0 against
    16.2 and 13.1 for eight rows; in cache it beat PyTorch's at 64 rows too (0.24 against 0.31 ms
    for a 576 x 576 weight)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and weight.dim() == 2 and weight.shape[1] % 64 == 0 and kernel() is not None)


def takes_int4(weight: torch.Tensor, group_size: int) -> bool:
    """Whether an int4 layer built from this `[N, K]` weight in groups of `group_size` should run on
    `skinny_linear_int4`: a bf16 CPU weight, K a multiple of 64, groups of 32, 64 or 128, and the
    kernels built."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and weight.dim() == 2 and weight.shape[1] % 64 == 0 and group_size in (32, 64, 128)
            and kernel() is not None)


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
                     bits: torch.Tensor, scale: float, amx: bool = True) -> torch.Tensor:
    """Query tokens `[T, H, D]` over their rows' paged keys and values, token t seeing row
    `rows[t]`'s first `base[t]` keys and, of the 32 after them, those set in `bits[t]` (see
    `attention_plans.TokenPlan`); fp32 inside, a two-pass softmax -> `[T, H, D]` bf16. On AMX
    tiles where `attention_on_amx(D)` (`amx` False: the AVX-512 kernel regardless)."""
    return _ext().decode_attention(query, k_cache, v_cache, block_tables, rows, base, bits,
                                   scale, amx)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm of bf16 rows `x [..., H]` with a bf16 `weight [H]`, in one call."""
    return _ext().rms_norm(x, weight, eps)


SKINNY_BLOCK = 4  # weight rows per block of the int8 layout, and of bf16's on AMX (kRows)
LANE_ROWS = 16  # bf16 without AMX: N is padded to a multiple of this (one fp32 vector of rows)
LANE_BLOCK = 48  # bf16 without AMX: weight rows per block (kLaneRows in cpu_matmul.cpp)


def skinny_row_multiple() -> int:
    """`pack_skinny` pads N to a multiple of this here; a weight with N a multiple of it keeps
    its shape when packed (`pack_skinny(w).reshape(w.shape)`, see `skinny_view`)."""
    return SKINNY_BLOCK if amx_rows() else LANE_ROWS


def pack_skinny(weight: torch.Tensor) -> torch.Tensor:
    """`weight [N, K]` (bf16, K a multiple of 32) laid out for `skinny_linear`, rows past N zero.
    Without AMX: `[Np, K]`, N rounded up to 16, in blocks of 48 rows (the last 16 or 32 where
    Np is not a multiple of 48), each `[K/2, rows, 2]`. With AMX: blocks of four rows with their
    32-wide K chunks interleaved, `[ceil(N/4), K/32, 4, 32]`."""
    if amx_rows():
        return _pack_blocks(weight, 32)
    n, k = weight.shape
    if k % 32:
        raise ValueError(f"the skinny kernel needs K to be a multiple of 32, got {k}")
    rows = -(-n // LANE_ROWS) * LANE_ROWS
    padded = weight.new_zeros(rows, k)
    padded[:n] = weight
    packed = torch.empty_like(padded)
    whole = rows // LANE_BLOCK * LANE_BLOCK
    packed[:whole] = (padded[:whole].view(-1, LANE_BLOCK, k // 2, 2).transpose(1, 2)
                      .reshape(whole, k))
    packed[whole:] = padded[whole:].view(rows - whole, k // 2, 2).transpose(0, 1).reshape(-1, k)
    return packed


def skinny_view(weight: torch.Tensor) -> torch.Tensor:
    """`pack_skinny(w).reshape(w.shape)` (N a multiple of `skinny_row_multiple()`) as
    `skinny_linear` takes it."""
    if not amx_rows():
        return weight
    n, k = weight.shape
    return weight.view(n // SKINNY_BLOCK, k // 32, SKINNY_BLOCK, 32)


def unpack_skinny(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The `[N, K]` weight `pack_skinny` (or `pack_skinny_int8`) laid out (a copy)."""
    if packed.dim() == 2:
        rows, k = packed.shape
        whole = rows // LANE_BLOCK * LANE_BLOCK
        plain = torch.cat((
            packed[:whole].view(-1, k // 2, LANE_BLOCK, 2).transpose(1, 2).reshape(whole, k),
            packed[whole:].view(k // 2, rows - whole, 2).transpose(0, 1).reshape(-1, k)))
        return plain[:out_features]
    blocks, chunks, _, width = packed.shape
    return packed.transpose(1, 2).reshape(blocks * SKINNY_BLOCK, chunks * width)[:out_features]


def skinny_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for bf16 `x [..., K]` with few rows, fp32 accumulation, on
    `packed = pack_skinny(weight)`."""
    return _ext().skinny_linear(x, packed, out_features, bias)


def pack_skinny_int8(qweight: torch.Tensor) -> torch.Tensor:
    """An int8 `qweight [N, K]` (K a multiple of 64) laid out for `skinny_linear_int8`, as
    `pack_skinny` lays out bf16 weights but in 64-wide chunks: `[ceil(N/4), K/64, 4, 64]`."""
    return _pack_blocks(qweight, 64)


def skinny_linear_int8(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                       out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ (qweight * scales[:, None]).T (+ bias)` for bf16 `x [..., K]`, on `packed =
    pack_skinny_int8(qweight)` and float32 `scales [N]`; fp32 accumulation, bf16 out."""
    return _ext().skinny_linear_int8(x, packed, scales, out_features, bias)


INT4_BLOCK = 16  # weight rows per block of the int4 layout (kRows in cpu_matmul_int4.cpp)
# Calls of up to this many rows sum each row as a call of one row does (cpu_matmul_int4.cpp's
# four accumulators a row; longer calls take two, in another order).
INT4_EXACT_ROWS = 4


def pack_skinny_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Baton's int4 layout (`baton.kernels.quantized_matmul`: `qweight [N, K/2]`, two weights a
    byte, low nibble first; `scales`, `zeros [N, K/group]`) laid out for `skinny_linear_int4`
    (see cpu_matmul_int4.cpp): the weight `[ceil(N/16), K/8, 64]` bytes, each 64-byte line four
    K pairs of the block's 16 rows; scales and zeros `[ceil(N/16), K/group, 2, 16]` bf16. Rows
    past N are zero."""
    n, half = qweight.shape
    k = 2 * half
    if k % 64:
        raise ValueError(f"the skinny int4 kernel needs K to be a multiple of 64, got {k}")
    blocks = -(-n // INT4_BLOCK)
    q = qweight.new_zeros(blocks * INT4_BLOCK, k)
    q[:n] = torch.stack((qweight & 15, qweight >> 4), dim=2).view(n, k)
    # [block, row, line, nibble, parity] -> [block, line, row, parity, nibble]
    q = q.view(blocks, INT4_BLOCK, k // 8, 4, 2).permute(0, 2, 1, 4, 3)
    low = q[..., 0] | (q[..., 1] << 4)  # the 16-bit word's low byte (little-endian)
    high = q[..., 2] | (q[..., 3] << 4)
    packed = torch.stack((low, high), dim=-1).reshape(blocks, k // 8, 64).contiguous()
    groups = scales.shape[1]
    sz = scales.new_zeros(blocks * INT4_BLOCK, groups, 2)
    sz[:n] = torch.stack((scales, zeros), dim=2)
    sz = sz.to(torch.bfloat16).view(blocks, INT4_BLOCK, groups, 2).permute(0, 2, 3, 1)
    return packed, sz.contiguous()


def skinny_linear_int4(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor,
                       out_features: int, group_size: int,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ w.T (+ bias)` for bf16 `x [..., K]` and the int4 weight `(packed, sz) =
    pack_skinny_int4(...)` in groups of `group_size` (`w = (q - 8) * scale + zero`); fp32
    accumulation, bf16 out."""
    return _ext().skinny_linear_int4(x, packed, sz, out_features, group_size, bias)


def _pack_blocks(weight: torch.Tensor, width: int) -> torch.Tensor:
    n, k = weight.shape
    if k % width:
        raise ValueError(f"the skinny kernel needs K to be a multiple of {width}, got {k}")
    blocks = -(-n // SKINNY_BLOCK)
    padded = weight.new_zeros(blocks * SKINNY_BLOCK, k)
    padded[:n] = weight
    return padded.view(blocks, SKINNY_BLOCK, k // width, width).transpose(1, 2).contiguous()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' `apply_rotary_pos_emb` for one of q, k: bf16 `x [T, H, D]` with the step's
    `cos`, `sin` (`[1, T, D]` or `[T, D]`), bit for bit, in one call."""
    return _ext().rope(x, cos, sin)


def _ext() -> ModuleType:
    ext = kernel()
    if ext is None:
        raise RuntimeError("Baton's CPU decode kernel is not available on this machine")
    return ext
