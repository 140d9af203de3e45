// A whole decoder layer of a short CPU step in one call (see baton/actors/cpu_step.py); bound to
// Python in cpu_decode.cpp.
//
// A lean step's layer is about fifteen calls (two norms, four projections, two rotary calls, the
// KV write, attention, SiLU, a product and two residual adds) and a few dozen views between them;
// from Python that cost about 120 us a layer here, a third of an int4 token. DecodeLayer holds one
// layer's weights (as the skinny kernels take them; they take every call of a step this short)
// and runs the same calls from C++: the same kernels and the same ATen ops in the same order, so
// the same values bit for bit. SiLU times up and the residual adds run here instead of through
// ATen, with ATen's arithmetic (bits equal but for a NaN's payload): at nine rows (a verify step)
// ATen's bf16 silu, mul and add cost about 1.5 ms of a 23 ms step of the default model, and two
// copies of q and k and one of v (strided views of the stacked projection) another 0.5; the
// rotary call and the KV write now read those views in place.

#include <torch/extension.h>

#include <ATen/TensorIterator.h>

#include <cstring>
#include <optional>

#include "cpu_decode.h"

// Sleef's expf over 16 lanes (1 ulp), as libtorch_cpu exports it: what ATen's Vectorized<float>
// exp() calls on AVX-512. (sleef.h declares it only where the whole unit targets AVX-512.)
extern "C" __attribute__((target("avx512f"))) __m512 Sleef_expf16_u10(__m512);

namespace {

// Store k or v [T, Hkv, D] at flat `slots` [T] of a [Hkv, N, bs, D] cache (the KV write of
// baton.actors.paged_attention.write_kv).
void write_kv(torch::Tensor& cache, const torch::Tensor& slots, const torch::Tensor& new_kv) {
  const int64_t T = new_kv.size(0), hkv = new_kv.size(1), D = new_kv.size(2);
  const int64_t per_head = cache.size(1) * cache.size(2);
  TORCH_CHECK(cache.is_contiguous() && cache.size(0) == hkv && cache.size(3) == D,
              "the KV cache does not match the layer's heads");
  // Heads side by side, tokens at any stride: k and v as views of a stacked projection.
  auto src = new_kv.stride(2) == 1 && new_kv.stride(1) == D ? new_kv : new_kv.contiguous();
  const int64_t row_stride = src.stride(0);
  const auto* sp = src.data_ptr<at::BFloat16>();
  auto* cp = cache.data_ptr<at::BFloat16>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < per_head, "KV slot ", slot[t], " out of range");
    for (int64_t h = 0; h < hkv; ++h)
      std::memcpy(cp + (h * per_head + slot[t]) * D, sp + t * row_stride + h * D,
                  D * sizeof(at::BFloat16));
  }
}

// One row of silu_mul: 64 values at a time, as ATen's vectorized loop takes a bf16 row (two
// vectors of 32 per iteration): silu(g) = g / (1 + exp(-g)) in fp32 with Sleef's expf (ATen's
// Vectorized<float>::exp), rounded to bf16, times u in fp32, rounded to bf16.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void silu_mul_row(const at::BFloat16* g,
                                                                      const at::BFloat16* u,
                                                                      int64_t n,
                                                                      at::BFloat16* out) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 x = load_bf16(g + i, 0xFFFF);
    const __m512 neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), sign));
    const __m512 act = round_bf16(_mm512_div_ps(x, _mm512_add_ps(one, Sleef_expf16_u10(neg))));
    store_bf16(out + i, _mm512_mul_ps(act, load_bf16(u + i, 0xFFFF)), 0xFFFF);
  }
}

bool silu_mul_fits(int64_t rows, int64_t inter) {
  // ATen's loop takes each row in steps of 64 (no scalar tail) and runs the call on one thread
  // below its grain size; there its results are the vectorized ones this kernel reproduces.
  return inter % 64 == 0 && rows * inter < at::internal::GRAIN_SIZE;
}

}  // namespace

// gate_up [T, 2I] bf16 -> silu(gate) * up [T, I], bit for bit as at::silu then at::mul compute it
// where silu_mul_fits (else those two ATen calls).
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.scalar_type() == at::kBFloat16 &&
                  gate_up.size(1) % 2 == 0,
              "silu_mul takes bf16 gate_up [T, 2I]");
  const int64_t T = gate_up.size(0), inter = gate_up.size(1) / 2;
  if (!silu_mul_fits(T, inter) || gate_up.stride(1) != 1)
    return at::silu(gate_up.slice(1, 0, inter)) * gate_up.slice(1, inter, 2 * inter);
  auto out = torch::empty({T, inter}, gate_up.options());
  const auto* gp = gate_up.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  const int64_t stride = gate_up.stride(0);
  at::parallel_for(0, T, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      silu_mul_row(gp + t * stride, gp + t * stride + inter, inter, op + t * inter);
  });
  return out;
}

// a + b of two contiguous bf16 tensors of one shape: each sum in fp32 rounded to bf16, as ATen's
// add gives it, without its dispatch (a residual add of one 576-wide row: 3.5 us through ATen).
__attribute__((target("avx512f,avx512bw,avx512vl"))) torch::Tensor add_bf16(
    const torch::Tensor& a, const torch::Tensor& b) {
  if (!a.is_contiguous() || !b.is_contiguous() || a.sizes() != b.sizes() ||
      a.scalar_type() != at::kBFloat16 || b.scalar_type() != at::kBFloat16)
    return a + b;
  auto out = torch::empty_like(a);
  const auto* ap = a.data_ptr<at::BFloat16>();
  const auto* bp = b.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  const int64_t n = a.numel();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    store_bf16(op + i, _mm512_add_ps(load_bf16(ap + i, m), load_bf16(bp + i, m)), m);
  }
  return out;
}


Projection::Projection(torch::Tensor weight, c10::optional<torch::Tensor> scales, int64_t rows,
                       int64_t group, c10::optional<torch::Tensor> bias)
    : weight(std::move(weight)), scales(std::move(scales)), rows(rows), group(group),
      bias(std::move(bias)) {
  TORCH_CHECK(group == 0 || this->scales.has_value(), "int8 and int4 projections need scales");
}

torch::Tensor Projection::operator()(const torch::Tensor& x) const {
  if (group == 0) return skinny_linear(x, weight, rows, bias);
  if (group < 0) return skinny_linear_int8(x, weight, *scales, rows, bias);
  return skinny_linear_int4(x, weight, *scales, rows, group, bias);
}

DecodeLayer::DecodeLayer(torch::Tensor input_norm, torch::Tensor post_norm,
                         c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm,
                         Projection qkv, Projection o, Projection gate_up, Projection down,
                         int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double eps,
                         double scale)
    : input_norm(std::move(input_norm)), post_norm(std::move(post_norm)),
      q_norm(std::move(q_norm)), k_norm(std::move(k_norm)), qkv(std::move(qkv)), o(std::move(o)),
      gate_up(std::move(gate_up)), down(std::move(down)), n_heads(n_heads),
      n_kv_heads(n_kv_heads), head_dim(head_dim), eps(eps), scale(scale) {
  TORCH_CHECK(this->q_norm.has_value() == this->k_norm.has_value(),
              "q and k norms come together");
}

// hidden [T, H] bf16 -> the layer's output [T, H]; writes the step's keys and values at `slots`
// of the layer's caches and attends over them as cpu_decode.decode_attention does.
torch::Tensor DecodeLayer::forward(const torch::Tensor& hidden, const torch::Tensor& cos,
                                   const torch::Tensor& sin, torch::Tensor k_cache,
                                   torch::Tensor v_cache, const torch::Tensor& slots,
                                   const torch::Tensor& tables, const torch::Tensor& rows,
                                   const torch::Tensor& base, const torch::Tensor& bits) const {
  const int64_t T = hidden.size(0);
  const int64_t nq = n_heads * head_dim, nkv = n_kv_heads * head_dim;
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == T,
              "one int64 KV slot per token");
  auto x = rms_norm(hidden, input_norm, eps);
  auto qkv_out = qkv(x);
  auto q = qkv_out.slice(1, 0, nq).view({T, n_heads, head_dim});
  auto k = qkv_out.slice(1, nq, nq + nkv).view({T, n_kv_heads, head_dim});
  auto v = qkv_out.slice(1, nq + nkv, nq + 2 * nkv).view({T, n_kv_heads, head_dim});
  if (q_norm.has_value()) {
    q = rms_norm(q, *q_norm, eps);
    k = rms_norm(k, *k_norm, eps);
  }
  q = rope(q, cos, sin);
  k = rope(k, cos, sin);
  write_kv(k_cache, slots, k);
  write_kv(v_cache, slots, v);
  auto attn = decode_attention(q, k_cache, v_cache, tables, rows, base, bits, scale);
  auto h = add_bf16(hidden, o(attn.reshape({T, nq})));
  x = rms_norm(h, post_norm, eps);
  auto gu = gate_up(x);
  return add_bf16(h, down(silu_mul(gu)));
}
