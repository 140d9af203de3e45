// Skinny bf16 matmul for the CPU decode step: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), M small.
//
// oneDNN's bf16 GEMM is built for large M; at M = 1 it reads the weight at a fraction of the
// memory bandwidth. Here each thread streams its own rows of w once (prefetched a few blocks
// ahead) and keeps x (tiny) in L1: four weight rows at a time against up to four token rows,
// VDPBF16PS (avx512_bf16: pairs of bf16 multiplied and summed into fp32 lanes), one horizontal
// sum per output, rounded to bf16 once. K must be a multiple of 32; `baton.kernels.cpu_gemv`
// checks the CPU and the shapes, and leaves everything else to oneDNN.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/extension.h>

namespace {

constexpr int kRows = 4;  // weight rows per block
constexpr int kToks = 4;  // token rows per block

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
    for (int r = 0; r < kRows; ++r) {
      if (r >= nrows) break;
      __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * K + k);
      // Four blocks ahead: about as far as helps here (a prefetch past the end is harmless).
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + 4 * kRows) * K + k), _MM_HINT_T0);
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

}  // namespace

// x [..., K] bf16, w [N, K] bf16 contiguous, bias [N] (any float dtype) or None -> [..., N] bf16.
torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "skinny_linear takes bfloat16");
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2, "weight must be a contiguous [N, K] matrix");
  const int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(K % 32 == 0, "skinny_linear needs K to be a multiple of 32, got ", K);
  auto lead = x.sizes().vec();
  lead.pop_back();
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  auto out = torch::empty({M, N}, x.options());
  torch::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = bias->to(at::kFloat).contiguous();
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const auto* xp = reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int64_t blocks = (N + kRows - 1) / kRows;
  // A grain of 16 blocks (64 rows) keeps tiny matrices on one thread.
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kRows;
      const int64_t nrows = std::min<int64_t>(kRows, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kToks) {
        const int64_t ntoks = std::min<int64_t>(kToks, M - m0);
        dot_block(wp + n0 * K, K, xp + m0 * K, K, nrows, ntoks, bp ? bp + n0 : nullptr,
                  op + m0 * N + n0, N);
      }
    }
  });
  lead.push_back(N);
  return out.reshape(lead);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear", &skinny_linear, "bf16 x @ w.T for a few rows of x");
}
