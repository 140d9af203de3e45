// decode_attention's tiles (see cpu_attention.cpp: how the work is cut into tiles of up to
// sixteen query vectors of one sequence and one kv head, what each computes, and why every query
// comes out as it would alone) on Intel AMX, where the CPU has it:
// - scores: S^T [16 keys, 16 queries] = K (sixteen key rows, loaded as A straight from their
//   paged block) x Q^T (the tile's queries as K pairs, the B operand, laid out once), gathered
//   per query, scaled and masked in fp32;
// - softmax per query as the AVX-512 kernel takes it (softmax_bf16);
// - out [16 queries, D] = P (A, bf16) x V (B: key pairs interleaved, 32 keys a multiply), summed
//   in fp32, divided by the total and rounded to bf16 once.

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_decode.h"

namespace {

constexpr int kQueries = kTileQueries;  // query vectors of a tile (the B operand's columns)
constexpr int kKeys = 16;     // keys of a score multiply (the A operand's rows)
constexpr int kChunk = 32;    // keys of a P x V multiply (the A operand's columns)

// Tiles: the scores use 0 and 2 (S^T), 1 and 3 (key rows) and 4 + c (Q^T's dims 32c ..
// 32c + 31); P x V uses 0 (P), 1-3 (V) and 4 + c (the output's dims 16c .. 16c + 15, of a run
// of 64). Rows of 64 bytes; see configure_rows for how many.
__attribute__((target("amx-tile,amx-bf16"))) void score_chunk(int c, const void* k,
                                                               int64_t stride) {
  _tile_loadd(1, k, stride);
  switch (c) {
    case 0: _tile_dpbf16ps(0, 1, 4); break;
    case 1: _tile_dpbf16ps(0, 1, 5); break;
    case 2: _tile_dpbf16ps(0, 1, 6); break;
    default: _tile_dpbf16ps(0, 1, 7); break;
  }
}

// Two blocks of keys at once: chunk c of the first into S^T tile 0, of the second into tile 2.
__attribute__((target("amx-tile,amx-bf16"))) void score_pair(int c, const void* k0,
                                                              const void* k1, int64_t stride) {
  _tile_loadd(1, k0, stride);
  _tile_loadd(3, k1, stride);
  switch (c) {
    case 0: _tile_dpbf16ps(0, 1, 4); _tile_dpbf16ps(2, 3, 4); break;
    case 1: _tile_dpbf16ps(0, 1, 5); _tile_dpbf16ps(2, 3, 5); break;
    case 2: _tile_dpbf16ps(0, 1, 6); _tile_dpbf16ps(2, 3, 6); break;
    default: _tile_dpbf16ps(0, 1, 7); _tile_dpbf16ps(2, 3, 7); break;
  }
}

__attribute__((target("amx-tile,amx-bf16"))) void load_query(int c, const void* qt) {
  switch (c) {
    case 0: _tile_loadd(4, qt, 64); break;
    case 1: _tile_loadd(5, qt, 64); break;
    case 2: _tile_loadd(6, qt, 64); break;
    default: _tile_loadd(7, qt, 64); break;
  }
}

__attribute__((target("amx-tile,amx-bf16"))) void value_chunk(int c, const void* v) {
  switch (c) {
    case 0: _tile_loadd(1, v, 64); _tile_dpbf16ps(4, 0, 1); break;
    case 1: _tile_loadd(2, v, 64); _tile_dpbf16ps(5, 0, 2); break;
    case 2: _tile_loadd(3, v, 64); _tile_dpbf16ps(6, 0, 3); break;
    default: _tile_loadd(1, v, 64); _tile_dpbf16ps(7, 0, 1); break;
  }
}

__attribute__((target("amx-tile"))) void zero_out(int n) {
  _tile_zero(4);
  if (n > 1) _tile_zero(5);
  if (n > 2) _tile_zero(6);
  if (n > 3) _tile_zero(7);
}

__attribute__((target("amx-tile"))) void store_out(int c, float* p, int64_t stride) {
  switch (c) {
    case 0: _tile_stored(4, p, stride); break;
    case 1: _tile_stored(5, p, stride); break;
    case 2: _tile_stored(6, p, stride); break;
    default: _tile_stored(7, p, stride); break;
  }
}

// A thread's working memory, grown as calls need.
struct Scratch {
  std::vector<float> scores;    // [16, kpad]: each query's scaled, masked scores
  std::vector<uint16_t> p;      // [16, kpad]: its weights in bf16 (P, the A operand)
  std::vector<uint32_t> qt;     // [D / 2, 16]: the queries as K pairs (Q^T, the B operand)
  std::vector<uint16_t> keys;   // [16, D]: key rows gathered where a block is not 16-aligned
  std::vector<float> st;        // [kpad / 16, 16 keys, 16 queries]: S^T, block by block
  alignas(64) uint16_t vb[4 * 16 * 32];  // four V tiles: 16 key pairs x 16 dims x 2
  std::vector<float> out;       // [16, D]: P x V's sums
};

// Every tile 16 rows of 64 bytes, but P (tile 0) and the output tiles (4-7) `m` rows, the
// tile's queries in P x V: a decode token's tile has only its few query heads, and with 16 rows
// its P x V took longer (decode calls ran 5-15% slower than the AVX-512 kernel; with `m` rows,
// as fast).
void configure_rows(int m) {
  uint8_t rows[8];
  uint16_t colsb[8];
  for (int t = 0; t < 8; ++t) {
    rows[t] = (t == 0 || t >= 4) ? m : 16;
    colsb[t] = 64;
  }
  configure_tiles(8, rows, colsb);
}

__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
void attend_tile(const AttentionCall& a, const int64_t* tokens, const QueryTile& tile,
                 Scratch& s) {
  const int64_t D = a.D, n = tile.n;
  const TileKeys keys(a, tokens, tile);
  const int64_t kmax = keys.kmax, gap_base = keys.gap_base;
  const int64_t* out_at = keys.out_at;
  const int64_t* base = keys.base;
  const uint32_t* bits = keys.bits;
  const int64_t kpad = (kmax + kChunk - 1) / kChunk * kChunk;
  if (static_cast<int64_t>(s.scores.size()) < kQueries * kpad) {
    s.scores.resize(kQueries * kpad);
    s.p.resize(kQueries * kpad);
  }
  s.qt.assign(D / 2 * kQueries, 0);
  for (int64_t i = 0; i < n; ++i) {
    const auto* src = reinterpret_cast<const uint32_t*>(a.q + out_at[i]);
    for (int64_t pr = 0; pr < D / 2; ++pr) s.qt[pr * kQueries + i] = src[pr];
  }
  const int64_t chunks = D / 32;
  configure_rows(kKeys);
  for (int64_t c = 0; c < chunks; ++c) load_query(c, s.qt.data() + c * 16 * kQueries);

  const uint16_t* kh = a.k + tile.head * a.head_stride;
  const uint16_t* vh = a.v + tile.head * a.head_stride;
  const int64_t bs = a.bs;
  auto slot = [&](int64_t j) { return keys.slot(j); };

  // S^T on the tiles, two blocks of sixteen keys at a time (two independent sums in flight).
  const int64_t blocks = (kmax + kKeys - 1) / kKeys;
  if (static_cast<int64_t>(s.st.size()) < (blocks + 1) * kKeys * kQueries)
    s.st.resize((blocks + 1) * kKeys * kQueries);
  auto key_rows = [&](int64_t j0, uint16_t* buf) -> const uint16_t* {
    if (bs % kKeys == 0 && j0 + kKeys <= gap_base)
      return kh + slot(j0);  // the sixteen keys lie in one block, in order
    for (int64_t r = 0; r < kKeys; ++r) {
      if (j0 + r < kmax) std::memcpy(buf + r * D, kh + slot(j0 + r), D * sizeof(uint16_t));
      else std::memset(buf + r * D, 0, D * sizeof(uint16_t));
    }
    return buf;
  };
  if (bs % kKeys != 0 || gap_base != INT64_MAX) s.keys.resize(2 * kKeys * D);
  for (int64_t b = 0; b < blocks; b += 2) {
    const uint16_t* r0 = key_rows(b * kKeys, s.keys.data());
    _tile_zero(0);
    if (b + 1 < blocks) {
      const uint16_t* r1 = key_rows((b + 1) * kKeys, s.keys.data() + kKeys * D);
      _tile_zero(2);
      for (int64_t c = 0; c < chunks; ++c) score_pair(c, r0 + c * 32, r1 + c * 32, D * 2);
      _tile_stored(2, s.st.data() + (b + 1) * kKeys * kQueries, kQueries * 4);
    } else {
      for (int64_t c = 0; c < chunks; ++c) score_chunk(c, r0 + c * 32, D * 2);
    }
    _tile_stored(0, s.st.data() + b * kKeys * kQueries, kQueries * 4);
  }

  // Each query's scores (its column of S^T), scaled, masked, with their max.
  const __m512i column = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(kQueries));
  const __m512 scale = _mm512_set1_ps(a.scale), none = _mm512_set1_ps(-INFINITY);
  __m512 best[kQueries];
  for (int64_t i = 0; i < n; ++i) best[i] = none;
  for (int64_t j0 = 0; j0 < kpad; j0 += kKeys) {
    __m512 col[kQueries];
    const float* st = s.st.data() + j0 * kQueries;
    if (j0 >= kmax) {
      for (int64_t i = 0; i < n; ++i) col[i] = none;
    } else if (n > 4) {  // past four queries a transpose costs less than a gather each
      for (int r = 0; r < kKeys; ++r) col[r] = _mm512_loadu_ps(st + r * kQueries);
      transpose16(col);
    } else {
      for (int64_t i = 0; i < n; ++i) col[i] = _mm512_i32gather_ps(column, st + i, 4);
    }
    for (int64_t i = 0; i < n; ++i) {
      const __mmask16 seen = static_cast<__mmask16>(visible(base[i], bits[i], j0));
      const __m512 v = _mm512_mask_mul_ps(none, seen, col[i], scale);
      _mm512_storeu_ps(s.scores.data() + i * kpad + j0, v);
      best[i] = _mm512_max_ps(best[i], v);
    }
  }

  // Softmax: weights rounded to bf16, their total from the rounded values.
  float inv[kQueries];
  for (int64_t i = 0; i < n; ++i)
    inv[i] = softmax_bf16(s.scores.data() + i * kpad, s.p.data() + i * kpad, kpad, best[i]);

  // P x V, 64 dims (four output tiles) at a time, 32 keys a multiply. V's rows go in as key
  // pairs: two rows' 32 dims interleaved within each 128-bit lane (one unpack each way), so
  // the B tile of a 32-dim run's low unpack holds its dims 0-3, 8-11, 16-19, 24-27 and the high
  // one the others; the output is put back in order at the end.
  s.out.resize(kQueries * D);
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int nd = static_cast<int>(std::min<int64_t>(64, D - d0) / 16);
    if (d0 == 0) configure_rows(static_cast<int>(n));
    zero_out(nd);
    for (int64_t j0 = 0; j0 < kpad; j0 += kChunk) {
      for (int64_t r = 0; r < kChunk / 2; ++r) {
        const int64_t j = j0 + 2 * r;
        const uint16_t* v0 = j < kmax ? vh + slot(j) + d0 : nullptr;
        const uint16_t* v1 = j + 1 < kmax ? vh + slot(j + 1) + d0 : nullptr;
        for (int u = 0; u < nd / 2; ++u) {
          const __m512i x = v0 ? _mm512_loadu_si512(v0 + 32 * u) : _mm512_setzero_si512();
          const __m512i y = v1 ? _mm512_loadu_si512(v1 + 32 * u) : _mm512_setzero_si512();
          _mm512_store_si512(s.vb + (2 * u) * 512 + r * 32, _mm512_unpacklo_epi16(x, y));
          _mm512_store_si512(s.vb + (2 * u + 1) * 512 + r * 32, _mm512_unpackhi_epi16(x, y));
        }
      }
      _tile_loadd(0, s.p.data() + j0, kpad * 2);
      for (int c = 0; c < nd; ++c) value_chunk(c, s.vb + c * 512);
    }
    for (int c = 0; c < nd; ++c) store_out(c, s.out.data() + d0 + c * 16, D * 4);
  }
  for (int64_t i = 0; i < n; ++i)
    store_unpacked(s.out.data() + i * D, D, inv[i], a.out + out_at[i]);
}

}  // namespace

bool amx_attention_fits(int64_t D) { return amx_ready() && D % 32 == 0 && D <= 128; }

void amx_attention(const AttentionCall& a) {
  std::vector<std::vector<int64_t>> tokens;
  const std::vector<QueryTile> tiles = plan_tiles(a, tokens, false);
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch scratch;
    for (int64_t i = begin; i < end; ++i)
      attend_tile(a, tokens[tiles[i].seq].data(), tiles[i], scratch);
    release_tiles();
  });
}
