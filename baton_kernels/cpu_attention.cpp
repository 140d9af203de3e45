// decode_attention's work, as both of its kernels take it (see cpu_decode.cpp for the call):
// query tokens of a decode or verify step over their sequences' paged bf16 keys and values, in
// tiles of up to sixteen query vectors of one sequence and one kv head, and the AVX-512 BF16
// kernel that runs a tile where the CPU has no AMX (cpu_attention_amx.cpp runs it on the tiles).
//
// A tile holds a verify run's tokens times the kv head's query heads (or one decode token's
// query heads), so the run reads its keys and values once per sixteen query vectors instead of
// once per token, and its multiplies run on VDPBF16PS (pairs of bf16 products summed into fp32):
// - scores: sixteen keys at a time as the sixteen lanes: their rows transposed into dim pairs
//   (K^T) once for all the tile's queries that read them, each query's dim pairs broadcast
//   against them, two sums per query (even and odd pairs, added at the end); scaled and masked
//   in fp32;
// - softmax per query over its keys (the max, e^(s - max) in fp32, rounded to bf16 as the
//   weights P, their total summed from the rounded weights);
// - out [query, D] = P x V: V's rows as key pairs (two rows' dims interleaved within each
//   128-bit lane), each query's weight pair broadcast against them, the dims as the lanes,
//   summed in fp32, divided by the total and rounded to bf16 once.
// P in bf16 is what paged-attention GPU kernels (vLLM's, FlashAttention's) multiply V by; it
// costs up to one bf16 rounding of each weight. The AMX kernel computes the same quantities on
// the tile unit.
//
// Every query's numbers depend on its own query, keys and mask alone: keys it does not see
// weigh exactly 0 (and past the tile's last key, rows read as zeros), and each output is summed
// in the same order whatever else shares the tile. So a verify run's tokens come out as decode
// tokens would, and speculation stays lossless. A tree token's ancestors sit at their tree slots,
// with gaps, until the accepted ones move to the chain they form; where the weights are summed
// depends on a key's index (its lane in the total, its pair in P x V), so such a token reads its
// visible keys at the indices of that chain (TileKeys). Here a tree's tokens still share a tile:
// the keys before the draft are read once for all of them, and each token's own from there on
// (the AMX kernel gives each tree token a tile of its own).
//
// Against the kernel it replaced (each token and kv head alone, fp32 products of widened bf16),
// on an AMD EPYC without AMX: 8- and 16-token verify runs 1.5-1.8x faster, 8-token trees about
// 2.5-3x, single tokens about as fast (the table in baton/kernels/cpu_decode.py).

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpu_decode.h"

std::vector<QueryTile> plan_tiles(const AttentionCall& a,
                                  std::vector<std::vector<int64_t>>& tokens, bool trees_together) {
  tokens.assign(a.B, {});
  for (int64_t t = 0; t < a.T; ++t) tokens[a.rows[t]].push_back(t);
  std::vector<QueryTile> tiles;
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t n = static_cast<int64_t>(tokens[b].size()) * a.groups;
    bool tree = false, one_base = true;
    for (const int64_t t : tokens[b]) {
      tree = tree || !is_chain(static_cast<uint32_t>(a.bits[t]));
      one_base = one_base && a.base[t] == a.base[tokens[b][0]];
    }
    // Chains and decode tokens share tiles, sixteen query vectors at a time; a tree's tokens
    // too where asked (and they share a base), else a tile each.
    const int64_t per_tile = tree && !(trees_together && one_base) ? a.groups : kTileQueries;
    for (int64_t h = 0; h < a.Hkv; ++h)
      for (int64_t first = 0; first < n; first += per_tile)
        tiles.push_back({b, h, first, static_cast<int>(std::min<int64_t>(per_tile, n - first))});
  }
  return tiles;
}

TileKeys::TileKeys(const AttentionCall& a, const int64_t* tokens, const QueryTile& tile)
    : table(a.tables + tile.seq * a.nb), bs(a.bs), D(a.D) {
  bool tree = false;
  for (int64_t i = 0; i < tile.n; ++i) {
    const int64_t qi = tile.first + i, t = tokens[qi / a.groups];
    out_at[i] = (t * a.H + tile.head * a.groups + qi % a.groups) * a.D;
    base[i] = a.base[t];
    bits[i] = static_cast<uint32_t>(a.bits[t]);
    tok[i] = static_cast<int>(qi / a.groups - tile.first / a.groups);
    kmax = std::max(kmax, bits[i] ? base[i] + 32 - __builtin_clz(bits[i]) : base[i]);
    tree = tree || !is_chain(bits[i]);
  }
  if (!tree) return;
  // A tree's tokens (one base: plan_tiles) each read their path as the chain it becomes.
  gap_base = base[0];
  kmax = 0;
  int64_t m = 0;
  for (int64_t i = 0; i < tile.n; ++i) {
    if (i == 0 || tok[i] != tok[i - 1]) {
      m = 0;
      for (uint32_t w = bits[i]; w; w &= w - 1) path[tok[i]][m++] = gap_base + __builtin_ctz(w);
    }
    base[i] = gap_base + m;
    bits[i] = 0;
    kmax = std::max(kmax, base[i]);
  }
}

namespace {

constexpr int kKeys = 16;   // keys of a score block (the lanes)
constexpr int kChunk = 32;  // keys of a P x V chunk (sixteen pairs)

// A thread's working memory, grown as calls need.
struct Scratch {
  std::vector<float> scores;  // [16, kpad]: each query's scaled, masked scores
  std::vector<uint16_t> p;    // [16, kpad]: its weights in bf16 (read as key pairs)
  std::vector<float> out;     // [16, D]: P x V's sums, each 32-dim run as its two unpacks
  std::vector<int64_t> at;    // [kmax]: where each key of the tile's list is in the head's cache
  alignas(64) uint32_t kt[kMaxHeadDim / 2 * kKeys];  // a score block's keys: dim pairs x lanes
  alignas(64) uint16_t vt[kChunk / 2 * kMaxHeadDim * 2];  // a chunk's key pairs, interleaved
};

// Up to 32 bf16 values at `p` (n of them, the rest zero), as 512 bits.
__attribute__((target("avx512f,avx512bw"))) inline __m512i load32(const uint16_t* p, int64_t n) {
  return n >= 32 ? _mm512_loadu_si512(p)
                 : _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1u << n) - 1), p);
}

// P x V for one chunk of sixteen key pairs `vt` (each pair's RUNS 32-dim runs, low and high
// unpack) into the sums `o[q]` of queries q < Q, their weight pairs `pp[q]`: Q queries' 2 x RUNS
// sums in flight, each still summed pair after pair.
template <int RUNS, int Q>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
inline void pv_chunk(const uint16_t* vt, const uint32_t* const* pp, float* const* o) {
  __m512 acc[Q][RUNS][2];
  for (int q = 0; q < Q; ++q)
    for (int u = 0; u < RUNS; ++u) {
      acc[q][u][0] = _mm512_loadu_ps(o[q] + 32 * u);
      acc[q][u][1] = _mm512_loadu_ps(o[q] + 32 * u + 16);
    }
  for (int r = 0; r < kChunk / 2; ++r) {
    __m512bh w[Q];
    for (int q = 0; q < Q; ++q) w[q] = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[q][r]));
    for (int u = 0; u < RUNS; ++u) {
      const __m512bh lo = (__m512bh)_mm512_load_si512(vt + (r * RUNS + u) * 64);
      const __m512bh hi = (__m512bh)_mm512_load_si512(vt + (r * RUNS + u) * 64 + 32);
      for (int q = 0; q < Q; ++q) {
        acc[q][u][0] = _mm512_dpbf16_ps(acc[q][u][0], lo, w[q]);
        acc[q][u][1] = _mm512_dpbf16_ps(acc[q][u][1], hi, w[q]);
      }
    }
  }
  for (int q = 0; q < Q; ++q)
    for (int u = 0; u < RUNS; ++u) {
      _mm512_storeu_ps(o[q] + 32 * u, acc[q][u][0]);
      _mm512_storeu_ps(o[q] + 32 * u + 16, acc[q][u][1]);
    }
}

// The chunk for the tile's n queries (weights `p`, rows of `kpad`, from key j0; sums `out`, rows
// of RUNS * 32): two at a time while their sums fit the registers.
template <int RUNS>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void pv_tile(const uint16_t* vt, const uint16_t* p, int64_t kpad, int64_t j0, float* out,
             int64_t n) {
  constexpr int kPair = RUNS <= 4 ? 2 : 1;
  auto pp = [&](int64_t i) { return reinterpret_cast<const uint32_t*>(p + i * kpad + j0); };
  int64_t i = 0;
  for (; i + kPair <= n; i += kPair) {
    const uint32_t* w[kPair];
    float* o[kPair];
    for (int q = 0; q < kPair; ++q) {
      w[q] = pp(i + q);
      o[q] = out + (i + q) * RUNS * 32;
    }
    pv_chunk<RUNS, kPair>(vt, w, o);
  }
  for (; i < n; ++i) {
    const uint32_t* w[1] = {pp(i)};
    float* o[1] = {out + i * RUNS * 32};
    pv_chunk<RUNS, 1>(vt, w, o);
  }
}

using PvTile = void (*)(const uint16_t*, const uint16_t*, int64_t, int64_t, float*, int64_t);
constexpr PvTile kPvTile[8] = {pv_tile<1>, pv_tile<2>, pv_tile<3>, pv_tile<4>,
                               pv_tile<5>, pv_tile<6>, pv_tile<7>, pv_tile<8>};

// The sixteen keys at `rows` (null: a zero row), D dims, transposed into `kt` as dim pairs x
// the sixteen lanes.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void transpose_keys(const uint16_t* const* rows, int64_t D, uint32_t* kt) {
  const int64_t pairs = D / 2;
  for (int64_t c = 0; c < pairs; c += 16) {  // dim pairs c .. c + 15 of the sixteen keys
    __m512 r[kKeys];
    for (int k = 0; k < kKeys; ++k)
      r[k] = rows[k] ? _mm512_castsi512_ps(load32(rows[k] + 2 * c, D - 2 * c))
                     : _mm512_setzero_ps();
    transpose16(r);
    for (int64_t e = 0; e < 16 && c + e < pairs; ++e)
      _mm512_store_ps(reinterpret_cast<float*>(kt + (c + e) * kKeys), r[e]);
  }
}

// Key pairs of a chunk (rows 2r and 2r + 1 at `rows`, null: zero) interleaved into `vt`: each
// pair's 32-dim runs as their low and high unpacks.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void interleave_values(const uint16_t* const* rows, int64_t D, uint16_t* vt) {
  const int64_t runs = (D + 31) / 32;
  for (int64_t r = 0; r < kChunk / 2; ++r)
    for (int64_t u = 0; u < runs; ++u) {
      const int64_t left = D - 32 * u;
      const __m512i x = rows[2 * r] ? load32(rows[2 * r] + 32 * u, left) : _mm512_setzero_si512();
      const __m512i y = rows[2 * r + 1] ? load32(rows[2 * r + 1] + 32 * u, left)
                                        : _mm512_setzero_si512();
      uint16_t* to = vt + (r * runs + u) * 64;
      _mm512_store_si512(to, _mm512_unpacklo_epi16(x, y));
      _mm512_store_si512(to + 32, _mm512_unpackhi_epi16(x, y));
    }
}

// One tile on AVX-512 BF16 (see the file's doc).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void attend_tile_avx512(const AttentionCall& a, const int64_t* tokens, const QueryTile& tile,
                        Scratch& s) {
  const int64_t D = a.D, n = tile.n, pairs = D / 2, runs = (D + 31) / 32;
  const TileKeys keys(a, tokens, tile);
  const int64_t kmax = keys.kmax, plain = keys.shared();
  const int64_t kpad = (kmax + kChunk - 1) / kChunk * kChunk;
  if (static_cast<int64_t>(s.scores.size()) < kTileQueries * kpad) {
    s.scores.resize(kTileQueries * kpad);
    s.p.resize(kTileQueries * kpad);
  }
  const uint16_t* kh = a.k + tile.head * a.head_stride;
  const uint16_t* vh = a.v + tile.head * a.head_stride;
  if (static_cast<int64_t>(s.at.size()) < plain) s.at.resize(plain);
  keys.slots(s.at.data());
  const int64_t* at = s.at.data();
  // Queries that read the same keys: all of them, or in a tree's tile past the shared keys each
  // token's (queries lo .. hi - 1, keys up to end, past the shared ones token t's path).
  struct Readers {
    int64_t lo, hi, end;
    int t;
  };
  const Readers all[1] = {{0, n, kmax, 0}};
  Readers own[kTileQueries];
  int tokens_here = 0;
  for (int64_t i = 0; i < n; ++i)
    if (i == 0 || keys.tok[i] != keys.tok[i - 1]) {
      if (tokens_here > 0) own[tokens_here - 1].hi = i;
      own[tokens_here++] = {i, n, keys.base[i], keys.tok[i]};
    }
  // Who reads keys j0 .. j0 + width - 1 alike, and the rows each reads there (`h`: K or V).
  auto readers = [&](int64_t j0, int64_t width) -> std::pair<const Readers*, int> {
    if (j0 + width <= plain || plain == kmax) return {all, 1};
    return {own, tokens_here};
  };
  auto rows_of = [&](const uint16_t* h, int64_t j0, int width, const Readers& r,
                     const uint16_t** rows) {
    for (int k = 0; k < width; ++k) {
      const int64_t j = j0 + k;
      rows[k] = j < plain ? h + at[j] : j < r.end ? h + keys.slot(j, r.t) : nullptr;
    }
  };

  // Scores, sixteen keys at a time as the lanes: their rows transposed into dim pairs once per
  // group, each query's dim pairs broadcast against them, four queries' sums in flight (two
  // each: even and odd pairs, added at the end).
  const __m512 scale = _mm512_set1_ps(a.scale), none = _mm512_set1_ps(-INFINITY);
  __m512 best[kTileQueries];
  for (int64_t i = 0; i < n; ++i) best[i] = none;
  const uint32_t* q[kTileQueries];
  for (int64_t i = 0; i < n; ++i) q[i] = reinterpret_cast<const uint32_t*>(a.q + keys.out_at[i]);
  for (int64_t j0 = 0; j0 < kpad; j0 += kKeys) {
    if (j0 >= kmax) {
      for (int64_t i = 0; i < n; ++i) _mm512_storeu_ps(s.scores.data() + i * kpad + j0, none);
      continue;
    }
    const auto [set, count] = readers(j0, kKeys);
    for (int g = 0; g < count; ++g) {
      const Readers& r = set[g];
      const uint16_t* rows[kKeys];
      rows_of(kh, j0, kKeys, r, rows);
      transpose_keys(rows, D, s.kt);
      for (int64_t i0 = r.lo; i0 < r.hi; i0 += 4) {
        const int64_t m = std::min<int64_t>(4, r.hi - i0);
        __m512 acc[4][2];
        for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        for (int64_t pr = 0; pr < pairs; pr += 2) {
          const __m512bh k0 = (__m512bh)_mm512_load_si512(s.kt + pr * kKeys);
          const __m512bh k1 = (__m512bh)_mm512_load_si512(s.kt + (pr + 1) * kKeys);
          for (int i = 0; i < 4; ++i) {
            if (i >= m) break;
            const uint32_t* qi = q[i0 + i];
            acc[i][0] = _mm512_dpbf16_ps(
                acc[i][0], k0, (__m512bh)_mm512_set1_epi32(static_cast<int>(qi[pr])));
            acc[i][1] = _mm512_dpbf16_ps(
                acc[i][1], k1, (__m512bh)_mm512_set1_epi32(static_cast<int>(qi[pr + 1])));
          }
        }
        for (int i = 0; i < m; ++i) {
          const int64_t qi = i0 + i;
          const __mmask16 seen =
              static_cast<__mmask16>(visible(keys.base[qi], keys.bits[qi], j0));
          const __m512 v = _mm512_mask_mul_ps(none, seen, _mm512_add_ps(acc[i][0], acc[i][1]),
                                              scale);
          _mm512_storeu_ps(s.scores.data() + qi * kpad + j0, v);
          best[qi] = _mm512_max_ps(best[qi], v);
        }
      }
    }
  }

  // Softmax: weights rounded to bf16, their total from the rounded values.
  float inv[kTileQueries];
  for (int64_t i = 0; i < n; ++i) inv[i] = softmax_bf16(s.scores.data() + i * kpad,
                                                        s.p.data() + i * kpad, kpad, best[i]);

  // P x V, sixteen key pairs at a time, interleaved once per group.
  s.out.assign(kTileQueries * runs * 32, 0.0f);
  for (int64_t j0 = 0; j0 < kpad; j0 += kChunk) {
    const auto [set, count] = readers(j0, kChunk);
    for (int g = 0; g < count; ++g) {
      const Readers& r = set[g];
      const uint16_t* rows[kChunk];
      rows_of(vh, j0, kChunk, r, rows);
      interleave_values(rows, D, s.vt);
      kPvTile[runs - 1](s.vt, s.p.data() + r.lo * kpad, kpad, j0, s.out.data() + r.lo * runs * 32,
                        r.hi - r.lo);
    }
  }
  for (int64_t i = 0; i < n; ++i)
    store_unpacked(s.out.data() + i * runs * 32, D, inv[i], a.out + keys.out_at[i]);
}

}  // namespace

void avx512_attention(const AttentionCall& a) {
  std::vector<std::vector<int64_t>> tokens;
  const std::vector<QueryTile> tiles = plan_tiles(a, tokens, true);
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch scratch;
    for (int64_t i = begin; i < end; ++i)
      attend_tile_avx512(a, tokens[tiles[i].seq].data(), tiles[i], scratch);
  });
}
