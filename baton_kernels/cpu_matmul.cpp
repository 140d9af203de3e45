// Baton's skinny matmuls for the CPU decode step (see baton/kernels/cpu_decode.py); bound to
// Python in cpu_decode.cpp.
//
// skinny_linear: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), M small.
// oneDNN's bf16 GEMM is built for large M; at M = 1 it reads the weight at a fraction of the
// memory bandwidth. Here the weight is laid out once, at load (pack_skinny), so that a call reads
// it front to back as one stream, which the hardware prefetcher keeps up with (the plain [N, K]
// layout read four rows side by side, four short streams, at about half the bandwidth).
//
// Without AMX the layout is `[Np, K]` for Np = N rounded up to 16: blocks of 48 rows (the last
// 16 or 32 where Np is not a multiple of 48), each laid out [K/2, rows, 2], so one 64-byte line
// holds a pair of K for 16 rows. A vector's fp32 lanes are output rows (lanes_block), so a
// verify step's eight token rows cost eight dot products per weight vector read, with no
// horizontal sums, and a pass over the weight reads it once for all of them. Against the layout
// this replaced (blocks of four rows, K in the lanes, a horizontal sum per output, four token
// rows a pass), over the default model's 210 projections cold in cache, 2 threads, an AMD EPYC
// (ms): 8.7 -> 8.0 at one row, 9.7 -> 7.5 at eight, 18.3 -> 11.2 at 16 (baton/kernels/
// cpu_decode.py has the table).
//
// On a CPU with AMX, pack_skinny lays weights out in blocks of four rows with their 32-wide K
// chunks interleaved ([N/4, K/32, 4, 32]), and skinny_linear runs every call on the tile unit
// (cpu_matmul_amx.cpp), kAmxMaxRows rows at a time.
//
// skinny_linear_int8: the same for a weight-only int8 weight (per output channel scales), laid
// out in blocks of four rows with their 64-wide K chunks interleaved, [N/4, K/64, 4, 64]: weights
// widened to bf16 (exact) in registers once per block of four token rows, then VDPBF16PS with K
// in the lanes and one horizontal sum per output. A step reads half the bytes of bf16.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <array>
#include <cstring>
#include <utility>

#include "cpu_decode.h"

namespace {

constexpr int kRows = 4;  // weight rows per block (int8)
constexpr int kToks = 4;  // token rows per block (int8)
constexpr int64_t kLaneRows = 48;  // weight rows per block of the bf16 layout: three vectors
constexpr int64_t kLaneToks = 8;  // token rows per pass over a block (24 accumulators)

// One block of 16 * Tiles weight rows, laid out [K/2, 16 * Tiles, 2] (each pair of K of every
// row side by side), against Toks token rows of x: a vector's 16 fp32 lanes are 16 output rows,
// each VDPBF16PS one pair of x (broadcast) into a pair of each of 16 rows, so no horizontal sums
// are left at the end and one load of x serves Tiles vectors. Every output is one chain of dot
// products over K in order, whatever Toks is: a call gives each row the bits a one-row call
// would.
template <int Toks, int Tiles>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void lanes_block(const uint16_t* w, int64_t K, const uint16_t* x, int64_t ldx, int64_t nrows,
                 const float* bias, at::BFloat16* out, int64_t ldo) {
  __m512 acc[Toks][Tiles];
  for (int t = 0; t < Toks; ++t)
    for (int i = 0; i < Tiles; ++i) acc[t][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 2) {
    const uint16_t* line = w + k * 16 * Tiles;  // this pair of K, for every row
    __m512bh wv[Tiles];
    for (int i = 0; i < Tiles; ++i) wv[i] = (__m512bh)_mm512_load_si512(line + i * 32);
    for (int t = 0; t < Toks; ++t) {
      int32_t pair;
      std::memcpy(&pair, x + t * ldx + k, sizeof pair);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      for (int i = 0; i < Tiles; ++i) acc[t][i] = _mm512_dpbf16_ps(acc[t][i], wv[i], xb);
    }
  }
  for (int i = 0; i < Tiles; ++i) {
    const int64_t left = nrows - i * 16;
    if (left <= 0) break;
    const __mmask16 rows = left >= 16 ? 0xFFFF : (1u << left) - 1;
    const __m512 b = bias ? _mm512_maskz_loadu_ps(rows, bias + i * 16) : _mm512_setzero_ps();
    for (int t = 0; t < Toks; ++t) {
      const __m256i y = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[t][i], b));
      _mm256_mask_storeu_epi16(out + t * ldo + i * 16, rows, y);
    }
  }
}

using LanesBlock = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t,
                            const float*, at::BFloat16*, int64_t);

template <int Tiles, int... Toks>
constexpr std::array<LanesBlock, sizeof...(Toks)> lanes_blocks(
    std::integer_sequence<int, Toks...>) {
  return {lanes_block<Toks + 1, Tiles>...};
}

// lanes_block for `toks` (1..kLaneToks) token rows and `tiles` (1..3) vectors of rows.
LanesBlock lanes_kernel(int64_t toks, int64_t tiles) {
  static const auto one = lanes_blocks<1>(std::make_integer_sequence<int, kLaneToks>{});
  static const auto two = lanes_blocks<2>(std::make_integer_sequence<int, kLaneToks>{});
  static const auto three = lanes_blocks<3>(std::make_integer_sequence<int, kLaneToks>{});
  const auto& by_toks = tiles == 1 ? one : tiles == 2 ? two : three;
  return by_toks[toks - 1];
}

// One block of four int8 weight rows, laid out [K/64, 4, 64], against up to four token rows of
// x (bf16): weights widened to bf16 once per block and token rows, then VDPBF16PS (pairs of bf16
// multiplied and summed into fp32 lanes) with K in the lanes; each output is its sum times its
// row's scale, plus its bias, rounded to bf16 once.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void dot_block_i8(const int8_t* w, int64_t K, const uint16_t* x, int64_t ldx, int64_t nrows,
                  int64_t ntoks, const float* scale, const float* bias, at::BFloat16* out,
                  int64_t ldo) {
  __m512 acc[kRows][kToks];
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kToks; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 64) {
    const int8_t* chunk = w + k * kRows;  // this K chunk of the block's four rows
    for (int s = 0; s < 64; s += 32) {
      __m512bh xv[kToks];
      for (int t = 0; t < kToks; ++t)
        xv[t] = t < ntoks ? (__m512bh)_mm512_loadu_si512(x + t * ldx + k + s)
                          : (__m512bh)_mm512_setzero_si512();
      for (int r = 0; r < kRows; ++r) {
        const __m512bh wv = int8_to_bf16(chunk + r * 64 + s);
        for (int t = 0; t < kToks; ++t) {
          if (t >= ntoks) break;
          acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
        }
      }
    }
  }
  for (int r = 0; r < nrows; ++r)
    for (int t = 0; t < ntoks; ++t)
      out[t * ldo + r] = at::BFloat16(_mm512_reduce_add_ps(acc[r][t]) * scale[r] +
                                      (bias ? bias[r] : 0.f));
}

}  // namespace

// x [..., K] against a packed weight of blocks of four rows for N outputs.
void check_packed(const char* name, const torch::Tensor& x, const torch::Tensor& w, int64_t K,
                  int64_t N) {
  const int64_t blocks = w.size(0);
  TORCH_CHECK(N > (blocks - 1) * kRows && N <= blocks * kRows, "a packed weight of ", blocks,
              " blocks cannot have ", N, " rows");
  TORCH_CHECK(x.size(-1) == K, name, ": rows of ", x.size(-1), " against a weight of ", K);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 64 == 0, name,
              " needs a 64-byte aligned weight");
}

// A skinny matmul on AMX tiles (cpu_matmul_amx.cpp): the same checks, rows and output, the
// weight `wp` of `w` (bf16, or int8 with `scale`).
torch::Tensor on_amx(const char* name, const torch::Tensor& x, const torch::Tensor& w,
                     const void* wp, int64_t K, int64_t N,
                     const c10::optional<torch::Tensor>& bias, const float* scale) {
  check_packed(name, x, w, K, N);
  const SkinnyRows io(x, K, N, bias);
  if (io.M > 0) amx_linear(io, wp, K, w.size(0), N, scale);
  return io.result();
}

// What both skinny matmuls share: checks of x [..., K] bf16 against a packed weight of `blocks`
// blocks of four rows for N outputs, and the loop over blocks (in parallel) and token rows;
// `block(n0, nrows, x rows, ntoks, bias or nullptr, out)` computes one block against up to four
// token rows -> [..., N] bf16.
template <typename Block>
torch::Tensor over_blocks(const char* name, const torch::Tensor& x, const torch::Tensor& w,
                          int64_t K, int64_t N, const c10::optional<torch::Tensor>& bias,
                          Block block) {
  check_packed(name, x, w, K, N);
  const int64_t blocks = w.size(0);
  const SkinnyRows io(x, K, N, bias);
  const int64_t M = io.M;
  const uint16_t* xp = io.x;
  const float* bp = io.bias;
  at::BFloat16* op = io.y;
  // A grain of 16 blocks (64 rows) keeps tiny matrices on one thread.
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kRows;
      const int64_t nrows = std::min<int64_t>(kRows, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kToks) {
        block(n0, nrows, xp + m0 * K, std::min<int64_t>(kToks, M - m0), bp ? bp + n0 : nullptr,
              op + m0 * N + n0);
      }
    }
  });
  return io.result();
}

// x [..., K] bf16, w the [N, K] weight as pack_skinny lays it out (rows past N zero): [Np, K]
// in blocks of 48 rows, or with AMX [ceil(N/4), K/32, 4, 32]; bias [N] (any float dtype) or None
// -> [..., N] bf16.
torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor w, int64_t N,
                            c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "skinny_linear takes bfloat16");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 64 == 0,
              "skinny_linear needs a 64-byte aligned weight");
  if (w.dim() == 4) {
    TORCH_CHECK(w.is_contiguous() && w.size(2) == kRows && w.size(3) == 32 && amx_ready(),
                "skinny_linear takes a weight packed by pack_skinny on this machine: this one "
                "is laid out for AMX, [N/4, K/32, 4, 32]");
    const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
    return on_amx("skinny_linear", x, w, wp, w.size(1) * 32, N, bias, nullptr);
  }
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2 && w.size(0) % 16 == 0 && w.size(1) % 2 == 0,
              "skinny_linear takes a weight packed by pack_skinny, [N rounded up to 16, K]");
  const int64_t K = w.size(1);
  const int64_t padded = w.size(0);
  TORCH_CHECK(N > padded - 16 && N <= padded, "a packed weight of ", padded,
              " rows cannot have ", N, " rows");
  TORCH_CHECK(x.size(-1) == K, "skinny_linear: rows of ", x.size(-1), " against a weight of ", K);
  const SkinnyRows io(x, K, N, bias);
  const int64_t M = io.M;
  const uint16_t* xp = io.x;
  const float* bp = io.bias;
  at::BFloat16* op = io.y;
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const int64_t blocks = (padded + kLaneRows - 1) / kLaneRows;
  // A grain of two blocks: a matrix of one block (48 rows or fewer) stays on one thread.
  at::parallel_for(0, blocks, 2, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kLaneRows;
      const int64_t rows = std::min<int64_t>(kLaneRows, padded - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kLaneToks) {
        const int64_t toks = std::min<int64_t>(kLaneToks, M - m0);
        lanes_kernel(toks, rows / 16)(wp + n0 * K, K, xp + m0 * K, K,
                                      std::min<int64_t>(rows, N - n0), bp ? bp + n0 : nullptr,
                                      op + m0 * N + n0, N);
      }
    }
  });
  return io.result();
}

// x [..., K] bf16, w the [N, K] int8 weight in blocks ([ceil(N/4), K/64, 4, 64] int8, rows past
// N zero; see baton.kernels.cpu_decode.pack_skinny_int8), scale [N] fp32, bias [N] (any float
// dtype) or None -> [..., N] bf16.
torch::Tensor skinny_linear_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t N,
                                 c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kChar &&
                  scale.scalar_type() == at::kFloat,
              "skinny_linear_int8 takes bfloat16 rows, an int8 weight and float32 scales");
  TORCH_CHECK(w.is_contiguous() && w.dim() == 4 && w.size(2) == kRows && w.size(3) == 64,
              "skinny_linear_int8 takes a weight packed by pack_skinny_int8, [N/4, K/64, 4, 64]");
  TORCH_CHECK(scale.is_contiguous() && scale.numel() == N, "one scale per output row");
  const int64_t K = w.size(1) * 64;
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  if (amx_ready())  // any number of rows, kAmxMaxRows at a time
    return on_amx("skinny_linear_int8", x, w, wp, K, N, bias, sp);
  return over_blocks("skinny_linear_int8", x, w, K, N, bias,
                     [&](int64_t n0, int64_t nrows, const uint16_t* xr, int64_t ntoks,
                         const float* bp, at::BFloat16* out) {
                       dot_block_i8(wp + n0 * K, K, xr, K, nrows, ntoks, sp + n0, bp, out, N);
                     });
}
