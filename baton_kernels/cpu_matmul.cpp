// Baton's skinny matmuls for the CPU decode step (see baton/kernels/cpu_decode.py); bound to
// Python in cpu_decode.cpp.
//
// skinny_linear: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), M small.
// oneDNN's bf16 GEMM is built for large M; at M = 1 it reads the weight at a fraction of the
// memory bandwidth. Here the weight is laid out once, at load, in blocks of four rows with their
// 32-wide K chunks interleaved ([N/4, K/32, 4, 32]), so a call reads it front to back as one
// stream: the hardware prefetcher keeps up, where four interleaved row streams (the plain
// [N, K] layout) reached about half the bandwidth. Each thread takes whole blocks and keeps x
// (tiny) in L1: four weight rows against up to four token rows, VDPBF16PS (avx512_bf16: pairs of
// bf16 multiplied and summed into fp32 lanes), one horizontal sum per output, rounded to bf16
// once. `baton.kernels.cpu_decode` checks the CPU and the shapes, and leaves everything else to
// oneDNN.
//
// On a CPU with AMX, skinny_linear runs calls of up to kAmxMaxRows rows, and skinny_linear_int8
// every call, on the tile unit instead (cpu_matmul_amx.cpp), over the same packed weights.
//
// skinny_linear_int8: the same for a weight-only int8 weight (per output channel scales), laid
// out [N/4, K/64, 4, 64]: weights widened to bf16 (exact) in registers once per block of four
// token rows, then VDPBF16PS. A step reads half the bytes of bf16.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/extension.h>

#include "cpu_decode.h"

namespace {

constexpr int kRows = 4;  // weight rows per block
constexpr int kToks = 4;  // token rows per block

// One block of four weight rows, laid out [K/32, 4, 32], against up to four token rows of x.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void dot_block(const uint16_t* w, int64_t K, const uint16_t* x, int64_t ldx, int64_t nrows,
               int64_t ntoks, const float* bias, at::BFloat16* out, int64_t ldo) {
  __m512 acc[kRows][kToks];
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kToks; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh xv[kToks];
    for (int t = 0; t < kToks; ++t)
      xv[t] = t < ntoks ? (__m512bh)_mm512_loadu_si512(x + t * ldx + k)
                        : (__m512bh)_mm512_setzero_si512();
    const uint16_t* chunk = w + k * kRows;  // this K chunk of the block's four rows
    for (int r = 0; r < kRows; ++r) {
      __m512bh wv = (__m512bh)_mm512_load_si512(chunk + r * 32);
      for (int t = 0; t < kToks; ++t) {
        if (t >= ntoks) break;
        acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
      }
    }
  }
  for (int r = 0; r < nrows; ++r)
    for (int t = 0; t < ntoks; ++t)
      out[t * ldo + r] = at::BFloat16(_mm512_reduce_add_ps(acc[r][t]) + (bias ? bias[r] : 0.f));
}

// One block of four int8 weight rows, laid out [K/64, 4, 64], against up to four token rows of
// x (bf16): weights widened to bf16 once per block and token rows, VDPBF16PS as in dot_block;
// each output is its sum times its row's scale, plus its bias, rounded to bf16 once.
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

// x [..., K] bf16, w the [N, K] weight in blocks ([ceil(N/4), K/32, 4, 32] bf16, rows past N
// zero; see baton.kernels.cpu_decode.pack_skinny), bias [N] (any float dtype) or None
// -> [..., N] bf16.
torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor w, int64_t N,
                            c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "skinny_linear takes bfloat16");
  TORCH_CHECK(w.is_contiguous() && w.dim() == 4 && w.size(2) == kRows && w.size(3) == 32,
              "skinny_linear takes a weight packed by pack_skinny, [N/4, K/32, 4, 32]");
  const int64_t K = w.size(1) * 32;
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  if (x.dim() > 0 && x.size(-1) > 0 && x.numel() / x.size(-1) <= kAmxMaxRows && amx_ready())
    return on_amx("skinny_linear", x, w, wp, K, N, bias, nullptr);
  return over_blocks("skinny_linear", x, w, K, N, bias,
                     [&](int64_t n0, int64_t nrows, const uint16_t* xr, int64_t ntoks,
                         const float* bp, at::BFloat16* out) {
                       dot_block(wp + n0 * K, K, xr, K, nrows, ntoks, bp, out, N);
                     });
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
