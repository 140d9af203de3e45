// Baton's bf16 kernels for the CPU decode step (see baton/kernels/cpu_decode.py), and the
// Python module of them all (the skinny matmuls are in cpu_matmul.cpp).
//
// rms_norm: Llama's RMSNorm in one call instead of eight small ones.
//
// rope: rotary position embedding of a step's queries or keys in one call.
//
// decode_attention: decode tokens (and short runs: a token and its draft, chain or tree) over
// their sequences' paged keys and values, read in place, each (token, kv head) pair on one
// thread with its query heads together.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cmath>
#include <vector>

#include "cpu_decode.h"

namespace {

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

__attribute__((target("avx512f"))) inline __m512 widen(const uint16_t* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

constexpr int kMaxGroup = 16;     // query heads per kv head
constexpr int kMaxHeadDim = 256;

// One kv head of one query token: its `groups` query heads over the keys it sees in paged
// blocks, the first `base` keys of its sequence and, from the 32 after them, those set in
// `bits` (a token of a draft tree sees its ancestors only). Scores, softmax and the weighted sum
// all in fp32; the output rounded to bf16 once.
__attribute__((target("avx512f")))
void attend_kv_head(const uint16_t* q, int64_t groups, int64_t D, const uint16_t* k_head,
                    const uint16_t* v_head, const int64_t* table, int64_t bs, int64_t base,
                    uint32_t bits, float scale, float* scores, uint16_t* out) {
  int64_t extra[32];
  int64_t n_extra = 0;
  for (int j = 0; j < 32; ++j)
    if (bits >> j & 1u) extra[n_extra++] = base + j;
  const int64_t ctx = base + n_extra;
  auto slot = [&](int64_t i) {
    const int64_t t = i < base ? i : extra[i - base];
    return (table[t / bs] * bs + t % bs) * D;
  };
  const int64_t chunks = D / 16;
  __m512 qv[kMaxGroup][kMaxHeadDim / 16];
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t c = 0; c < chunks; ++c)
      qv[g][c] = _mm512_mul_ps(widen(q + g * D + c * 16), _mm512_set1_ps(scale));
  float best[kMaxGroup];
  for (int64_t g = 0; g < groups; ++g) best[g] = -INFINITY;
  for (int64_t t = 0; t < ctx; ++t) {
    const uint16_t* k = k_head + slot(t);
    __m512 kc[kMaxHeadDim / 16];
    for (int64_t c = 0; c < chunks; ++c) kc[c] = widen(k + c * 16);
    for (int64_t g = 0; g < groups; ++g) {
      __m512 acc = _mm512_mul_ps(qv[g][0], kc[0]);
      for (int64_t c = 1; c < chunks; ++c) acc = _mm512_fmadd_ps(qv[g][c], kc[c], acc);
      const float s = _mm512_reduce_add_ps(acc);
      scores[g * ctx + t] = s;
      best[g] = s > best[g] ? s : best[g];
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    float* sg = scores + g * ctx;
    const __m512 m = _mm512_set1_ps(best[g]);
    __m512 total = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 16 <= ctx; t += 16) {
      __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(sg + t), m));
      _mm512_storeu_ps(sg + t, e);
      total = _mm512_add_ps(total, e);
    }
    if (t < ctx) {
      const __mmask16 tail = static_cast<__mmask16>((1u << (ctx - t)) - 1);
      __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sg + t), m));
      e = _mm512_maskz_mov_ps(tail, e);
      _mm512_mask_storeu_ps(sg + t, tail, e);
      total = _mm512_add_ps(total, e);
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(total);
    for (int64_t i = 0; i < ctx; ++i) sg[i] *= inv;
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[kMaxHeadDim / 16];
    for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
    const float* pg = scores + g * ctx;
    for (int64_t t = 0; t < ctx; ++t) {
      const uint16_t* v = v_head + slot(t);
      const __m512 p = _mm512_set1_ps(pg[t]);
      for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(p, widen(v + c * 16), acc[c]);
    }
    alignas(64) float row[kMaxHeadDim];
    for (int64_t c = 0; c < chunks; ++c) _mm512_store_ps(row + c * 16, acc[c]);
    for (int64_t i = 0; i < D; ++i) out[g * D + i] = at::BFloat16(row[i]).x;
  }
}

}  // namespace

// Query tokens against their sequences' paged keys and values (a decode step, or a token and
// its draft): q [T, H, D] bf16, caches [Hkv, num_blocks, block_size, D] bf16, tables [B, nb]
// int64; per token, its sequence `rows[t]`, the keys it sees in full `base[t]` and the mask
// `bits[t]` over the 32 keys after them (see attend_kv_head) -> [T, H, D] bf16.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor tables, torch::Tensor rows, torch::Tensor base,
                               torch::Tensor bits, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.scalar_type() == at::kBFloat16,
              "decode_attention takes bfloat16");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  auto qc = q.contiguous();
  auto tab = tables.to(at::kLong).contiguous();
  auto row = rows.to(at::kLong).contiguous();
  auto full = base.to(at::kLong).contiguous();
  auto mask = bits.to(at::kLong).contiguous();
  const int64_t T = qc.size(0), H = qc.size(1), D = qc.size(2);
  const int64_t Hkv = k_cache.size(0), num_blocks = k_cache.size(1), bs = k_cache.size(2);
  TORCH_CHECK(H % Hkv == 0 && H / Hkv <= kMaxGroup, "unsupported grouping ", H, "/", Hkv);
  TORCH_CHECK(D % 16 == 0 && D <= kMaxHeadDim, "unsupported head_dim ", D);
  TORCH_CHECK(row.numel() == T && full.numel() == T && mask.numel() == T,
              "rows, base and bits need one entry per query token");
  const int64_t groups = H / Hkv, B = tab.size(0), nb = tab.size(1);
  const int64_t* rp = row.data_ptr<int64_t>();
  const int64_t* fp = full.data_ptr<int64_t>();
  const int64_t* mp = mask.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(rp[t] >= 0 && rp[t] < B, "query token ", t, " names sequence ", rp[t],
                " of ", B);
    TORCH_CHECK(mp[t] >= 0 && mp[t] < (int64_t{1} << 32), "bits must fit 32 bits");
    const int64_t last = mp[t] ? fp[t] + 31 - __builtin_clz(static_cast<uint32_t>(mp[t])) + 1
                               : fp[t];
    TORCH_CHECK(last >= 1 && last <= nb * bs, "context length ", last, " out of the table");
    longest = std::max(longest, fp[t] + 32);
  }
  auto out = torch::empty({T, H, D}, qc.options());
  const auto* qp = reinterpret_cast<const uint16_t*>(qc.data_ptr<at::BFloat16>());
  const auto* kp = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t* tp = tab.data_ptr<int64_t>();
  const int64_t head_stride = num_blocks * bs * D;
  at::parallel_for(0, T * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(groups * longest);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / Hkv, h = i % Hkv;
      attend_kv_head(qp + (t * H + h * groups) * D, groups, D, kp + h * head_stride,
                     vp + h * head_stride, tp + rp[t] * nb, bs, fp[t],
                     static_cast<uint32_t>(mp[t]), static_cast<float>(scale), scores.data(),
                     op + (t * H + h * groups) * D);
    }
  });
  return out;
}

// y = w * bf16(x * rsqrt(mean(x^2) + eps)) per row, x [..., H] and w [H] bf16: Llama's RMSNorm
// (statistics in fp32, the normalized row rounded to bf16 before the weight) in one call.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "rms_norm takes bfloat16");
  const int64_t H = w.numel();
  TORCH_CHECK(x.size(-1) == H, "rms_norm: rows of ", x.size(-1), " against a weight of ", H);
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t rows = xc.numel() / H;
  const auto* xp = xc.data_ptr<at::BFloat16>();
  const auto* wp = wc.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const at::BFloat16* xr = xp + r * H;
      float sum = 0.f;
      for (int64_t i = 0; i < H; ++i) {
        const float v = static_cast<float>(xr[i]);
        sum += v * v;
      }
      const float inv = 1.0f / std::sqrt(sum / static_cast<float>(H) + static_cast<float>(eps));
      for (int64_t i = 0; i < H; ++i) {
        const at::BFloat16 normed(static_cast<float>(xr[i]) * inv);
        op[r * H + i] = at::BFloat16(static_cast<float>(wp[i]) * static_cast<float>(normed));
      }
    }
  });
  return out;
}

// Rotary position embedding, transformers' rotate_half convention: x [T, H, D] bf16 and the
// step's cos, sin [T, D] bf16 -> x * cos + rotate_half(x) * sin, each product and the sum
// rounded to bf16 as torch's three bf16 ops round them (bit for bit), in one call.
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && cos.scalar_type() == at::kBFloat16 &&
                  sin.scalar_type() == at::kBFloat16,
              "rope takes bfloat16");
  TORCH_CHECK(x.dim() == 3, "rope takes x [tokens, heads, head_dim]");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  TORCH_CHECK(D % 2 == 0, "rope needs an even head_dim, got ", D);
  auto c = cos.reshape({-1, D}).contiguous();
  auto s = sin.reshape({-1, D}).contiguous();
  TORCH_CHECK(c.size(0) == T && s.size(0) == T, "rope: cos and sin need one row per token");
  auto xc = x.contiguous();
  auto out = torch::empty_like(xc);
  const auto* xp = xc.data_ptr<at::BFloat16>();
  const auto* cp = c.data_ptr<at::BFloat16>();
  const auto* sp = s.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      const at::BFloat16* xr = xp + (t * H + h) * D;
      at::BFloat16* orow = op + (t * H + h) * D;
      for (int64_t i = 0; i < D; ++i) {
        const float rotated = i < half ? -static_cast<float>(xr[i + half])
                                       : static_cast<float>(xr[i - half]);
        const at::BFloat16 a(static_cast<float>(xr[i]) * static_cast<float>(cp[t * D + i]));
        const at::BFloat16 b(rotated * static_cast<float>(sp[t * D + i]));
        orow[i] = at::BFloat16(static_cast<float>(a) + static_cast<float>(b));
      }
    }
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear", &skinny_linear, "bf16 x @ w.T for a few rows of x, w packed in blocks");
  m.def("skinny_linear_int8", &skinny_linear_int8,
        "bf16 x @ (int8 w * scale).T, w packed in blocks");
  m.def("skinny_linear_int4", &skinny_linear_int4,
        "bf16 x @ w.T for a few rows of x, w Baton's int4 in blocks");
  pybind11::class_<Projection>(m, "Projection")
      .def(pybind11::init<torch::Tensor, c10::optional<torch::Tensor>, int64_t, int64_t,
                          c10::optional<torch::Tensor>>())
      .def("set_dense", &Projection::set_dense)
      .def("__call__", &Projection::operator());
  pybind11::class_<DecodeLayer>(m, "DecodeLayer")
      .def(pybind11::init<torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>,
                          c10::optional<torch::Tensor>, Projection, Projection, Projection,
                          Projection, int64_t, int64_t, int64_t, double, double>())
      // Other Python threads (the worker's event loop, the KV link) run meanwhile.
      .def("forward", &DecodeLayer::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("decode_attention", &decode_attention, "query tokens over their paged bf16 KV");
  m.def("rms_norm", &rms_norm, "Llama's RMSNorm over bf16 rows");
  m.def("rope", &rope, "rotary position embedding, rotate_half convention, bf16");
}
