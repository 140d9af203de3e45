// Baton's skinny int4 matmul for the CPU decode step (see baton/kernels/cpu_decode.py); bound to
// Python in cpu_decode.cpp.
//
// skinny_linear_int4: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), M small, for Baton's int4 layout
// (w = (q - 8) * s + z, q in 0..15, a scale s and zero z per group of 32, 64 or 128 along K).
//
// Unlike the bf16 and int8 kernels, a vector's 16 fp32 lanes are 16 output rows, not 16 slices
// of K: each VDPBF16PS multiplies one pair of x (broadcast) into a pair of weights of each of 16
// rows, so a group's scale applies once per 16 rows and group (a vector multiply) instead of once
// per row and chunk, and no horizontal sums are left at the end. The weight is laid out once, at
// load, in blocks of 16 rows, each 64-byte line holding four pairs of K for the block's rows:
// 16-bit word 2r + i holds row r's weights k0 + i, k0 + 2 + i, k0 + 4 + i, k0 + 6 + i, one
// nibble each, lowest first. A nibble q becomes the bf16 128 + q by setting the exponent bits
// around it (0x4300 | q), so a line is four vectors after seven integer ops, with no
// conversion. A group's dot product is then s * sum(x * (128 + q)) + (z - 136 s) * sum(x), the
// group sums of x taken once per call. A step reads a quarter of the bytes of bf16, plus a bf16
// scale and zero per group and row.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cstring>
#include <vector>

#include "cpu_decode.h"

namespace {

constexpr int kRows = 16;  // weight rows per block: one fp32 vector
constexpr int kLine = 8;  // K per 64-byte line (four pairs)

// Four vectors of 16 rows x one K pair, as bf16 128 + q, from one 64-byte line.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
inline void line_to_bf16(const uint8_t* q, __m512bh v[4]) {
  const __m512i words = _mm512_load_si512(q);
  const __m512i nibble = _mm512_set1_epi16(0x000F);
  const __m512i exponent = _mm512_set1_epi16(0x4300);  // bf16 128: mantissa steps of 1
  // 0xEA: (a & b) | c
  v[0] = (__m512bh)_mm512_ternarylogic_epi32(words, nibble, exponent, 0xEA);
  v[1] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 4), nibble, exponent, 0xEA);
  v[2] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 8), nibble, exponent, 0xEA);
  v[3] = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(words, 12), exponent);
}

// 16 bf16 values as fp32.
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 bf16x16_to_float(const at::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// One block of 16 int4 weight rows ([K/8, 64] bytes) against up to four token rows of x (bf16).
// `sz` is the block's [K/group, 2, 16] bf16 scales and zeros, `xsum` the token rows' group sums
// ([ntoks, K/group] fp32), up to `Toks` token rows. Per token: `Chains` accumulators (the pairs
// of a line taken in turn, so that consecutive dot products do not wait on each other), summed
// and scaled at each group's end.
template <int Toks, int Chains>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void block_i4(const uint8_t* w, int64_t K, int64_t group, const uint16_t* x, int64_t ldx,
              int64_t nrows, int64_t ntoks, const at::BFloat16* sz, const float* xsum,
              const float* bias, at::BFloat16* out, int64_t ldo) {
  const int64_t groups = K / group;
  const __m512 minus136 = _mm512_set1_ps(-136.f);
  __m512 total[Toks];
  for (int t = 0; t < Toks; ++t) total[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[Toks][Chains];
    for (int t = 0; t < Toks; ++t)
      for (int i = 0; i < Chains; ++i) acc[t][i] = _mm512_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; k += kLine) {
      __m512bh v[4];
      line_to_bf16(w + k / kLine * 64, v);
      for (int t = 0; t < Toks; ++t) {
        if (t >= ntoks) break;
        const uint16_t* xt = x + t * ldx + k;
        for (int i = 0; i < 4; ++i) {
          int32_t pair;
          std::memcpy(&pair, xt + 2 * i, sizeof pair);
          acc[t][i % Chains] = _mm512_dpbf16_ps(acc[t][i % Chains], v[i],
                                                (__m512bh)_mm512_set1_epi32(pair));
        }
      }
    }
    const __m512 s = bf16x16_to_float(sz + g * 2 * kRows);
    const __m512 c = _mm512_fmadd_ps(s, minus136, bf16x16_to_float(sz + g * 2 * kRows + kRows));
    for (int t = 0; t < Toks; ++t) {
      if (t >= ntoks) break;
      __m512 dot = acc[t][0];
      for (int i = 1; i < Chains; ++i) dot = _mm512_add_ps(dot, acc[t][i]);
      total[t] = _mm512_fmadd_ps(dot, s, total[t]);
      total[t] = _mm512_fmadd_ps(c, _mm512_set1_ps(xsum[t * groups + g]), total[t]);
    }
  }
  const __mmask16 rows = nrows >= kRows ? 0xFFFF : (1u << nrows) - 1;
  const __m512 b = bias ? _mm512_maskz_loadu_ps(rows, bias) : _mm512_setzero_ps();
  for (int t = 0; t < ntoks; ++t) {
    const __m256i y = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(total[t], b));
    _mm256_mask_storeu_epi16(out + t * ldo, rows, y);
  }
}

}  // namespace

// x [..., K] bf16, w Baton's int4 [N, K] weight in blocks of 16 rows ([ceil(N/16), K/8, 64]
// uint8, rows past N zero; see baton.kernels.cpu_decode.pack_skinny_int4), sz its scales and
// zeros ([ceil(N/16), K/group, 2, 16] bf16), group 32, 64 or 128, bias [N] (any float dtype) or
// None -> [..., N] bf16.
torch::Tensor skinny_linear_int4(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t N,
                                 int64_t group, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kByte &&
                  sz.scalar_type() == at::kBFloat16,
              "skinny_linear_int4 takes bfloat16 rows, a uint8 weight and bfloat16 scales");
  TORCH_CHECK(w.is_contiguous() && w.dim() == 3 && w.size(2) == 64,
              "skinny_linear_int4 takes a weight packed by pack_skinny_int4, [N/16, K/8, 64]");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 64 == 0,
              "skinny_linear_int4 needs a 64-byte aligned weight");
  TORCH_CHECK(group == 32 || group == 64 || group == 128, "int4 groups of 32, 64 or 128, not ",
              group);
  const int64_t blocks = w.size(0);
  const int64_t K = w.size(1) * kLine;
  TORCH_CHECK(K % group == 0, "K = ", K, " is no multiple of the group size ", group);
  TORCH_CHECK(N > (blocks - 1) * kRows && N <= blocks * kRows, "a packed weight of ", blocks,
              " blocks cannot have ", N, " rows");
  const int64_t groups = K / group;
  TORCH_CHECK(sz.is_contiguous() && sz.dim() == 4 && sz.size(0) == blocks &&
                  sz.size(1) == groups && sz.size(2) == 2 && sz.size(3) == kRows,
              "scales and zeros laid out [N/16, K/group, 2, 16] (pack_skinny_int4)");
  TORCH_CHECK(x.size(-1) == K, "skinny_linear_int4: rows of ", x.size(-1),
              " against a weight of ", K);
  const SkinnyRows io(x, K, N, bias);
  const int64_t M = io.M;
  const uint16_t* xp = io.x;
  const float* bp = io.bias;
  // Each token row's sum of x over each group, once per call (torch's ops would cost more than
  // the sums).
  std::vector<float> xsum(M * groups);
  for (int64_t i = 0; i < M * groups; ++i) {
    float sum = 0.f;
    for (int64_t j = 0; j < group; ++j) {
      const uint32_t wide = static_cast<uint32_t>(xp[i * group + j]) << 16;
      float f;
      std::memcpy(&f, &wide, sizeof f);
      sum += f;
    }
    xsum[i] = sum;
  }
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const at::BFloat16* szp = sz.data_ptr<at::BFloat16>();
  at::BFloat16* op = io.y;
  // A grain of 4 blocks (64 rows) keeps tiny matrices on one thread.
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kRows;
      // Up to four token rows a pass with four accumulators each; eight with two (one pass
      // over the weight instead of two, for short verify steps and small batches).
      const bool wide = M > 4;
      const int64_t toks = wide ? 8 : 4;
      for (int64_t m0 = 0; m0 < M; m0 += toks) {
        auto block = wide ? block_i4<8, 2> : block_i4<4, 4>;
        block(wp + n0 * K / 2, K, group, xp + m0 * K, K, std::min<int64_t>(kRows, N - n0),
              std::min<int64_t>(toks, M - m0), szp + b * groups * 2 * kRows,
              xsum.data() + m0 * groups, bp ? bp + n0 : nullptr, op + m0 * N + n0, N);
      }
    }
  });
  return io.result();
}
