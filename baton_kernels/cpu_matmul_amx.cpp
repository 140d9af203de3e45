// The skinny matmuls on Intel AMX (see baton/kernels/cpu_decode.py): y[M, N] = x[M, K] @
// w[N, K]^T (* scale) (+ bias), on the weight as pack_skinny lays it out (blocks of four rows,
// their 32-wide K chunks interleaved) or pack_skinny_int8 does (64-wide chunks, int8, a scale per
// row), so no second copy of the weight is held. Rows go kAmxMaxRows at a time.
//
// A tile multiply (TDPBF16PS) takes 16 weight rows by 32 K against 16 token rows by 32 K in the
// time AVX-512 takes for a handful of dot products, so the calls of a verify step or a batch of
// decode rows read the weight once at the memory's speed instead of running out of multiplies
// past four rows. Per group of kGroupRows weight rows, for each 32-wide K chunk:
// - the chunk of each of the group's blocks is copied side by side into the A tiles (16 rows of
//   64 bytes each; int8 weights widened to bf16 on the way, exactly);
// - the step's rows, laid out once per call as K pairs (the B operand's layout), are loaded as B;
// - the fp32 sums stay in the C tiles over all of K.
// At the end each token row is gathered out of the C tiles, scaled (int8), the bias added, and
// rounded to bf16 once. Each output's sum runs the same tile ops in the same order whatever the
// other rows are, so a row's result does not depend on its batch.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_decode.h"

namespace {

constexpr int64_t kBlockRows = 4;   // weight rows per block of pack_skinny's layout
constexpr int64_t kTileRows = 16;   // rows of a tile (weight rows of A, K pairs of B)
constexpr int64_t kGroupRows = 32;  // weight rows per group: two A tiles share each B tile
constexpr int64_t kGroupBlocks = kGroupRows / kBlockRows;

// Tiles: A0, A1 (weight rows 0-15, 16-31 of a group), B0, B1 (token rows 0-15, 16-31), and the
// sums C[a][b] in tiles 4 + 2a + b.
void configure(int64_t M) {
  uint8_t rows[8] = {};
  uint16_t colsb[8] = {};
  const int64_t m[2] = {std::min<int64_t>(M, kTileRows), M - std::min<int64_t>(M, kTileRows)};
  for (int a = 0; a < 2; ++a) {
    rows[a] = kTileRows;
    colsb[a] = 64;
  }
  for (int b = 0; b < 2 && m[b] > 0; ++b) {
    rows[2 + b] = kTileRows;
    colsb[2 + b] = static_cast<uint16_t>(m[b] * 4);
    for (int a = 0; a < 2; ++a) {
      rows[4 + 2 * a + b] = kTileRows;
      colsb[4 + 2 * a + b] = static_cast<uint16_t>(m[b] * 4);
    }
  }
  configure_tiles(8, rows, colsb);
}

// One group of `nblocks` (up to kGroupBlocks) blocks starting at `w` (bf16, or int8 with
// `scale`), against the M step rows in `xk` (K pairs: [K/2, M, 2] bf16); writes its columns n0..
// of `out` [M, N].
template <bool kInt8>
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
void run_group(const void* w, int64_t K, int64_t nblocks, const uint16_t* xk, int64_t M,
               const float* scale, const float* bias, uint16_t* out, int64_t N, int64_t n0) {
  alignas(64) uint16_t a[kGroupBlocks * kBlockRows * 32];
  alignas(64) float c[2][2][kTileRows * kTileRows];
  const bool two_a = nblocks > kGroupBlocks / 2, two_b = M > kTileRows;
  if (nblocks < kGroupBlocks) std::memset(a, 0, sizeof(a));
  _tile_zero(4);
  _tile_zero(6);
  if (two_b) {
    _tile_zero(5);
    _tile_zero(7);
  }
  const int64_t pair_row = M * 2;  // bf16 elements per K pair of the step rows
  for (int64_t k = 0; k < K; k += 32) {
    for (int64_t b = 0; b < nblocks; ++b) {
      __m512i* dst = reinterpret_cast<__m512i*>(a + b * kBlockRows * 32);
      if constexpr (kInt8) {  // [K/64, 4, 64]: this chunk is half of a 64-wide one
        const int8_t* src = static_cast<const int8_t*>(w) + b * kBlockRows * K +
                            (k / 64) * kBlockRows * 64 + k % 64;
        for (int r = 0; r < kBlockRows; ++r) dst[r] = (__m512i)int8_to_bf16(src + r * 64);
      } else {
        const auto* src = reinterpret_cast<const __m512i*>(static_cast<const uint16_t*>(w) +
                                                           b * kBlockRows * K + k * 4);
        for (int r = 0; r < kBlockRows; ++r) dst[r] = _mm512_load_si512(src + r);
      }
    }
    const uint16_t* bk = xk + (k / 2) * pair_row;
    _tile_loadd(0, a, 64);
    _tile_loadd(2, bk, pair_row * 2);
    _tile_dpbf16ps(4, 0, 2);
    if (two_a) {
      _tile_loadd(1, a + kTileRows * 32, 64);
      _tile_dpbf16ps(6, 1, 2);
    }
    if (two_b) {
      _tile_loadd(3, bk + kTileRows * 2, pair_row * 2);
      _tile_dpbf16ps(5, 0, 3);
      if (two_a) _tile_dpbf16ps(7, 1, 3);
    }
  }
  _tile_stored(4, c[0][0], 64);
  if (two_a) _tile_stored(6, c[1][0], 64);
  if (two_b) {
    _tile_stored(5, c[0][1], 64);
    if (two_a) _tile_stored(7, c[1][1], 64);
  }
  // Token t's sums are column t % 16 of the C tiles of its B tile: gather, add the bias, round.
  const __m512i column = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(kTileRows));
  const int64_t nrows = std::min<int64_t>(nblocks * kBlockRows, N - n0);
  for (int half = 0; half < 2 && half * kTileRows < nrows; ++half) {
    const int64_t rows = std::min<int64_t>(kTileRows, nrows - half * kTileRows);
    const __mmask16 keep = static_cast<__mmask16>((1u << rows) - 1);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(keep, bias + n0 + half * kTileRows)
                           : _mm512_setzero_ps();
    const __m512 sv = kInt8 ? _mm512_maskz_loadu_ps(keep, scale + n0 + half * kTileRows)
                            : _mm512_setzero_ps();
    for (int64_t t = 0; t < M; ++t) {
      const float* sums = c[half][t / kTileRows] + t % kTileRows;
      __m512 v = _mm512_i32gather_ps(column, sums, 4);
      v = kInt8 ? _mm512_fmadd_ps(v, sv, bv) : _mm512_add_ps(v, bv);
      _mm256_mask_storeu_epi16(out + t * N + n0 + half * kTileRows, keep,
                               (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

}  // namespace

// The tile configuration LDTILECFG reads (palette 1).
struct TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

__attribute__((target("amx-tile"))) void configure_tiles(int n, const uint8_t* rows,
                                                         const uint16_t* colsb) {
  TileConfig cfg;
  for (int t = 0; t < n; ++t) {
    cfg.rows[t] = rows[t];
    cfg.colsb[t] = colsb[t];
  }
  // LDTILECFG reads the struct through memory the compiler does not see it read; without the
  // barrier GCC 12 drops the stores above.
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) void release_tiles() { _tile_release(); }

bool amx_ready() {
  static const bool ready = [] {
    const char* off = std::getenv("BATON_CPU_AMX");
    if (off != nullptr && std::strcmp(off, "0") == 0) return false;
    if (!__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("amx-tile")) return false;
    // Linux hands out the tile state only to a process that asks for it.
    constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ready;
}

void amx_linear(const SkinnyRows& io, const void* w, int64_t K, int64_t blocks, int64_t N,
                const float* scale) {
  const int64_t P = K / 2;
  const int64_t groups = (blocks + kGroupBlocks - 1) / kGroupBlocks;
  // The step rows as K pairs, [K/2, rows] of 32-bit pairs: the B tiles' rows. (A buffer kept
  // per thread: allocating and zeroing it anew cost more than filling it.)
  thread_local std::vector<uint32_t> pairs;
  if (static_cast<int64_t>(pairs.size()) < P * kAmxMaxRows) pairs.resize(P * kAmxMaxRows);
  for (int64_t m0 = 0; m0 < io.M; m0 += kAmxMaxRows) {
    const int64_t M = std::min<int64_t>(kAmxMaxRows, io.M - m0);
    const auto* src = reinterpret_cast<const uint32_t*>(io.x) + m0 * P;
    uint32_t* dst = pairs.data();
    for (int64_t p = 0; p < P; ++p, dst += M)
      for (int64_t t = 0; t < M; ++t) dst[t] = src[t * P + p];
    const auto* xk = reinterpret_cast<const uint16_t*>(pairs.data());
    auto* out = reinterpret_cast<uint16_t*>(io.y) + m0 * N;
    // A grain of 2 groups (64 rows) keeps tiny matrices on one thread.
    at::parallel_for(0, groups, 2, [&](int64_t begin, int64_t end) {
      configure(M);
      for (int64_t g = begin; g < end; ++g) {
        const int64_t b0 = g * kGroupBlocks, nblocks = std::min<int64_t>(kGroupBlocks, blocks - b0);
        if (scale != nullptr)
          run_group<true>(static_cast<const int8_t*>(w) + b0 * kBlockRows * K, K, nblocks, xk, M,
                          scale, io.bias, out, N, b0 * kBlockRows);
        else
          run_group<false>(static_cast<const uint16_t*>(w) + b0 * kBlockRows * K, K, nblocks,
                           xk, M, nullptr, io.bias, out, N, b0 * kBlockRows);
      }
      release_tiles();
    });
  }
}
