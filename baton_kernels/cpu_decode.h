// What Baton's CPU decode kernels export to Python (bound in cpu_decode.cpp).
#pragma once

#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

// What every skinny matmul does with its rows: x [..., K] as M contiguous bf16 rows, the bias
// (any float dtype, or none) as fp32, and an [M, N] output handed back as [..., N].
struct SkinnyRows {
  std::vector<int64_t> lead;
  torch::Tensor rows, out, bias_f;
  int64_t M;
  const uint16_t* x;
  const float* bias;
  at::BFloat16* y;

  SkinnyRows(const torch::Tensor& input, int64_t K, int64_t N,
             const c10::optional<torch::Tensor>& b)
      : lead(input.sizes().vec()), rows(input.reshape({-1, K}).contiguous()),
        out(torch::empty({rows.size(0), N}, input.options())), M(rows.size(0)) {
    lead.back() = N;
    if (b.has_value() && b->defined()) bias_f = b->to(at::kFloat).contiguous();
    x = reinterpret_cast<const uint16_t*>(rows.data_ptr<at::BFloat16>());
    bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
    y = out.data_ptr<at::BFloat16>();
  }
  torch::Tensor result() const { return out.reshape(lead); }
};

// cpu_matmul.cpp
torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor w, int64_t N,
                            c10::optional<torch::Tensor> bias);
torch::Tensor skinny_linear_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t N,
                                 c10::optional<torch::Tensor> bias);
torch::Tensor skinny_linear_int4(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t N,
                                 int64_t group, c10::optional<torch::Tensor> bias);

// 32 int8 weights as bf16 pairs (exact: every int8 is a bf16).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
inline __m512bh int8_to_bf16(const int8_t* q) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
      _mm_load_si128(reinterpret_cast<const __m128i*>(q))));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
      _mm_load_si128(reinterpret_cast<const __m128i*>(q + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// cpu_matmul_amx.cpp: the skinny matmuls on AMX tiles, where amx_ready() (the CPU has AMX, Linux
// grants the tile state, BATON_CPU_AMX is not 0): `blocks` blocks of pack_skinny's layout at `w`
// (bf16, `scale` null) or of pack_skinny_int8's (int8, `scale` per row); any rows, kAmxMaxRows at
// a time (skinny_linear hands it calls of up to kAmxMaxRows rows; oneDNN takes longer ones).
constexpr int64_t kAmxMaxRows = 32;
bool amx_ready();
void amx_linear(const SkinnyRows& io, const void* w, int64_t K, int64_t blocks, int64_t N,
                const float* scale);
// Load a tile configuration (palette 1) of `n` tiles, tile t `rows[t]` rows of `colsb[t]` bytes;
// release_tiles() gives the tile state back.
void configure_tiles(int n, const uint8_t* rows, const uint16_t* colsb);
void release_tiles();

// decode_attention's checked call, as its kernels take it: q [T, H, D], caches
// [Hkv, num_blocks, bs, D] (bf16 bits), tables [B, nb], and per token its sequence, base and bits.
struct AttentionCall {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* out;
  const int64_t* tables;
  const int64_t* rows;
  const int64_t* base;
  const int64_t* bits;
  int64_t T, H, Hkv, D, groups, B, nb, bs, head_stride;
  float scale;
};

constexpr int kMaxGroup = 16;     // query heads per kv head
constexpr int kMaxHeadDim = 256;
constexpr int kTileQueries = 16;  // query vectors of a tile

// cpu_attention.cpp: the work in tiles of up to kTileQueries query vectors of one sequence and
// kv head, and the AVX-512 BF16 kernel that runs them.
struct QueryTile {
  int64_t seq, head, first;  // the queries first .. first + n - 1 of sequence seq's list
  int n;
};
// Each sequence's query tokens in order (into `tokens`) and the tiles that cover them. A draft
// tree's tokens see different keys past their base: with `trees_together` they still share tiles
// (each token's queries reading its own path there), else each has a tile of its own.
std::vector<QueryTile> plan_tiles(const AttentionCall& a,
                                  std::vector<std::vector<int64_t>>& tokens, bool trees_together);

// The keys a tile's queries see: per query its output's offset, base and bits, and its token
// among the tile's; the tile's last key. In a tree's tile, each token reads the keys of its path
// at the chain positions they move to once accepted: position gap_base + m is the m-th key its
// bits show (`slot(j, t)`: where key j of token t's list is in the head's cache). Then its
// weights fall in the lanes and key pairs a decode step of the accepted path gives them, so the
// sums round alike.
struct TileKeys {
  int64_t out_at[kTileQueries], base[kTileQueries];
  uint32_t bits[kTileQueries];
  int tok[kTileQueries];
  int64_t kmax = 0;
  int64_t gap_base = INT64_MAX;
  int64_t path[kTileQueries][32];
  const int64_t* table;
  int64_t bs, D;
  TileKeys(const AttentionCall& a, const int64_t* tokens, const QueryTile& tile);
  int64_t slot(int64_t j, int t = 0) const {
    const int64_t r = j < gap_base ? j : path[t][j - gap_base];
    return (table[r / bs] * bs + r % bs) * D;
  }
  // The keys every query of the tile reads at the same place: the first min(kmax, gap_base).
  int64_t shared() const { return std::min(kmax, gap_base); }
  // slot(j) of every shared key, block by block (no division a key).
  void slots(int64_t* at) const {
    const int64_t plain = shared();
    for (int64_t j = 0, b = 0; j < plain; ++b) {
      const int64_t start = table[b] * bs * D;
      for (int64_t r = 0; r < bs && j < plain; ++r) at[j++] = start + r * D;
    }
  }
};
void avx512_attention(const AttentionCall& a);

// cpu_attention_amx.cpp: the tiles on AMX, for head dims that are a multiple of 32 up to 128
// where amx_ready().
bool amx_attention_fits(int64_t D);
void amx_attention(const AttentionCall& a);

// Whether a token's draft keys `bits` are a chain's (the first m after its base, none skipped).
inline bool is_chain(uint32_t bits) { return (bits & (bits + 1)) == 0; }

// Which of keys j0 .. j0 + 15 a query sees: the first `base` keys and, of the 32 after them,
// those set in `bits`.
inline uint32_t visible(int64_t base, uint32_t bits, int64_t j0) {
  uint32_t m = 0;
  if (j0 < base) m = base - j0 >= 16 ? 0xFFFFu : (1u << (base - j0)) - 1;
  const int64_t off = j0 - base;
  const uint64_t w = bits;
  if (off >= 0) m |= off < 32 ? static_cast<uint32_t>(w >> off) & 0xFFFFu : 0;
  else if (off > -16) m |= static_cast<uint32_t>(w << -off) & 0xFFFFu;
  return m;
}

// Rows r[0..15] of a 16 x 16 block become its columns (in 64 shuffles).
__attribute__((target("avx512f"))) inline void transpose16(__m512 r[16]) {
  __m512 a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // b[4i + c], per 128-bit lane L: rows 4i .. 4i + 3 of column 4L + c
  for (int i = 0; i < 4; ++i)
    for (int h = 0; h < 2; ++h) {
      const __m512d x = _mm512_castps_pd(a[4 * i + h]), y = _mm512_castps_pd(a[4 * i + 2 + h]);
      b[4 * i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(x, y));
      b[4 * i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(x, y));
    }
  for (int c = 0; c < 4; ++c) {
    const __m512 u0 = _mm512_shuffle_f32x4(b[c], b[4 + c], 0x44);
    const __m512 u1 = _mm512_shuffle_f32x4(b[c], b[4 + c], 0xEE);
    const __m512 w0 = _mm512_shuffle_f32x4(b[8 + c], b[12 + c], 0x44);
    const __m512 w1 = _mm512_shuffle_f32x4(b[8 + c], b[12 + c], 0xEE);
    r[c] = _mm512_shuffle_f32x4(u0, w0, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(u0, w0, 0xDD);
    r[8 + c] = _mm512_shuffle_f32x4(u1, w1, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(u1, w1, 0xDD);
  }
}

// e^x for x <= 0 (Cephes' expf: x = n ln2 + r, a degree-5 polynomial in r, scaled by 2^n).
__attribute__((target("avx512f"))) inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// Up to 16 bf16 values at `p` (lanes past `mask` read as zero) widened to fp32 (exact).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load_bf16(
    const at::BFloat16* p, __mmask16 mask) {
  const __m256i v = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// fp32 lanes rounded to bf16 exactly as c10::BFloat16(float) rounds them (to nearest even, any
// NaN to 0x7FC0, denormals kept): the bf16 bits in each 32-bit lane's low half.
__attribute__((target("avx512f"))) inline __m512i bf16_bits(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q),
                               _mm512_set1_epi32(0x7FC0));
}

// The value a bf16 tensor would hold for each lane.
__attribute__((target("avx512f"))) inline __m512 round_bf16(__m512 f) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(f), 16));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void store_bf16(
    at::BFloat16* p, __m512 f, __mmask16 mask) {
  _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(bf16_bits(f)));
}

inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// The weights of one query of a tile: e^(s - max) of its `kpad` scores `s` (-inf where it does
// not see the key; `best` their lane-wise max) rounded to bf16 into `p`; returns 1 / their total,
// summed from the rounded weights.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline float softmax_bf16(
    const float* s, uint16_t* p, int64_t kpad, __m512 best) {
  const __m512 none = _mm512_set1_ps(-INFINITY);
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(best));
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < kpad; j += 16) {
    const __m512 x = _mm512_loadu_ps(s + j);
    const __mmask16 seen = _mm512_cmp_ps_mask(x, none, _CMP_NEQ_OQ);
    const __m512 e = _mm512_maskz_mov_ps(seen, exp_nonpositive(_mm512_sub_ps(x, m)));
    const __m256i w = (__m256i)_mm512_cvtneps_pbh(e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), w);
    total = _mm512_add_ps(total,
                          _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 16)));
  }
  return 1.0f / _mm512_reduce_add_ps(total);
}

// A query's P x V sums `row`, each 32-dim run as its low and high unpack of V's key pairs (dims
// 0-3, 8-11, 16-19, 24-27 of the run, then the others), times `inv`, back in dim order and
// rounded to bf16: D values at `dst`.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void store_unpacked(
    const float* row, int64_t D, float inv, uint16_t* dst) {
  // Dims 32u + e: for e < 16, lane e of the low unpack's 4L + e % 8 where e % 8 < 4, else the
  // high one's 4L + e % 8 - 4 (index 16 + that), L = e / 8; for e >= 16 the same with
  // L = 2 + (e - 16) / 8.
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  const __m512 f = _mm512_set1_ps(inv);
  for (int64_t d = 0; d < D; d += 32) {
    const __m512 low = _mm512_loadu_ps(row + d), high = _mm512_loadu_ps(row + d + 16);
    const __m512 x = _mm512_mul_ps(_mm512_permutex2var_ps(low, first, high), f);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), (__m256i)_mm512_cvtneps_pbh(x));
    if (d + 16 < D) {
      const __m512 y = _mm512_mul_ps(_mm512_permutex2var_ps(low, second, high), f);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d + 16),
                          (__m256i)_mm512_cvtneps_pbh(y));
    }
  }
}

// cpu_decode.cpp
// (`amx` false: the AVX-512 kernel even where the AMX one would take the call)
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor tables, torch::Tensor rows, torch::Tensor base,
                               torch::Tensor bits, double scale, bool amx = true);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);

// cpu_logits.cpp
torch::Tensor argmax_rows(torch::Tensor logits);
std::tuple<torch::Tensor, torch::Tensor> top_logprobs(torch::Tensor logits, int64_t k);

// cpu_layer.cpp
// One projection on a skinny kernel: `group` 0 bf16 (`weight` from pack_skinny), -1 int8
// (pack_skinny_int8, float32 `scales`), else int4 in groups of `group` (pack_skinny_int4, its
// scales and zeros as `scales`); `rows` output rows.
struct Projection {
  torch::Tensor weight;
  c10::optional<torch::Tensor> scales;
  int64_t rows;
  int64_t group;
  c10::optional<torch::Tensor> bias;
  Projection(torch::Tensor weight, c10::optional<torch::Tensor> scales, int64_t rows,
             int64_t group, c10::optional<torch::Tensor> bias);
  torch::Tensor operator()(const torch::Tensor& x) const;
};

// silu(gate) * up of gate_up [T, 2I] bf16, bit for bit as ATen's two calls give it.
torch::Tensor silu_mul(const torch::Tensor& gate_up);
// a + b of bf16 tensors (ATen's add where they are not two contiguous ones of one shape).
torch::Tensor add_bf16(const torch::Tensor& a, const torch::Tensor& b);

// One Llama-family decoder layer (q/k norms for Qwen3) for short bf16 CPU steps.
struct DecodeLayer {
  torch::Tensor input_norm, post_norm;
  c10::optional<torch::Tensor> q_norm, k_norm;
  Projection qkv, o, gate_up, down;
  int64_t n_heads, n_kv_heads, head_dim;
  double eps, scale;
  DecodeLayer(torch::Tensor input_norm, torch::Tensor post_norm,
              c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm,
              Projection qkv, Projection o, Projection gate_up, Projection down, int64_t n_heads,
              int64_t n_kv_heads, int64_t head_dim, double eps, double scale);
  torch::Tensor forward(const torch::Tensor& hidden, const torch::Tensor& cos,
                        const torch::Tensor& sin, torch::Tensor k_cache, torch::Tensor v_cache,
                        const torch::Tensor& slots, const torch::Tensor& tables,
                        const torch::Tensor& rows, const torch::Tensor& base,
                        const torch::Tensor& bits) const;
};
