// Baton's bf16 kernels for the CPU decode step (see baton/kernels/cpu_decode.py), and the
// Python module of them all (the skinny matmuls are in cpu_matmul.cpp).
//
// rms_norm: Llama's RMSNorm in one call instead of eight small ones.
//
// rope: rotary position embedding of a step's queries or keys in one call.
//
// decode_attention: decode tokens (and short runs: a token and its draft, chain or tree) over
// their sequences' paged keys and values, read in place, in tiles of up to sixteen query vectors
// of one sequence and kv head: on AVX-512 BF16 (cpu_attention.cpp), or where the CPU has AMX on
// the tiles (cpu_attention_amx.cpp).

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cmath>

#include "cpu_decode.h"

// Query tokens against their sequences' paged keys and values (a decode step, or a token and
// its draft): q [T, H, D] bf16, caches [Hkv, num_blocks, block_size, D] bf16, tables [B, nb]
// int64; per token, its sequence `rows[t]`, the keys it sees in full `base[t]` and the mask
// `bits[t]` over the 32 keys after them (see `visible`) -> [T, H, D] bf16.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor tables, torch::Tensor rows, torch::Tensor base,
                               torch::Tensor bits, double scale, bool amx) {
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
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(rp[t] >= 0 && rp[t] < B, "query token ", t, " names sequence ", rp[t],
                " of ", B);
    TORCH_CHECK(mp[t] >= 0 && mp[t] < (int64_t{1} << 32), "bits must fit 32 bits");
    const int64_t last = mp[t] ? fp[t] + 31 - __builtin_clz(static_cast<uint32_t>(mp[t])) + 1
                               : fp[t];
    TORCH_CHECK(last >= 1 && last <= nb * bs, "context length ", last, " out of the table");
  }
  auto out = torch::empty({T, H, D}, qc.options());
  const auto* qp = reinterpret_cast<const uint16_t*>(qc.data_ptr<at::BFloat16>());
  const auto* kp = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t* tp = tab.data_ptr<int64_t>();
  const int64_t head_stride = num_blocks * bs * D;
  const AttentionCall call{qp, kp, vp, op, tp, rp, fp, mp, T, H, Hkv, D, groups, B, nb, bs,
                           head_stride, static_cast<float>(scale)};
  if (amx && amx_attention_fits(D)) amx_attention(call);
  else avx512_attention(call);
  return out;
}

// One row of rms_norm below, 16 lanes at a time.
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void norm_row(
    const at::BFloat16* xr, const at::BFloat16* wp, int64_t H, float eps, at::BFloat16* orow) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < H; i += 16) {
    const __m512 v = load_bf16(xr + i, lanes(H - i));
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const float sum = _mm512_reduce_add_ps(acc);
  const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(sum / static_cast<float>(H) + eps));
  for (int64_t i = 0; i < H; i += 16) {
    const __mmask16 m = lanes(H - i);
    const __m512 normed = round_bf16(_mm512_mul_ps(load_bf16(xr + i, m), inv));
    store_bf16(orow + i, _mm512_mul_ps(load_bf16(wp + i, m), normed), m);
  }
}

// y = w * bf16(x * rsqrt(mean(x^2) + eps)) per row, x [..., H] and w [H] bf16: Llama's RMSNorm
// (statistics in fp32, the normalized row rounded to bf16 before the weight) in one call. Each
// row is summed the same way whatever rows share the call.
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
    for (int64_t r = begin; r < end; ++r)
      norm_row(xp + r * H, wp, H, static_cast<float>(eps), op + r * H);
  });
  return out;
}

// Rotary position embedding, transformers' rotate_half convention: x [T, H, D] bf16 and the
// step's cos, sin [T, D] bf16 -> x * cos + rotate_half(x) * sin, each product and the sum
// rounded to bf16 as torch's three bf16 ops round them (bit for bit), in one call: each half of
// a head's row 16 lanes at a time (rotate_half pairs lane i of the first half with lane i of the
// second).
__attribute__((target("avx512f,avx512bw,avx512vl")))
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
  // Heads of a row side by side, rows at any stride: q and k as views of a stacked projection.
  auto xc = x.stride(2) == 1 && x.stride(1) == D ? x : x.contiguous();
  const int64_t row_stride = xc.stride(0);
  auto out = torch::empty({T, H, D}, x.options());
  const auto* xp = xc.data_ptr<at::BFloat16>();
  const auto* cp = c.data_ptr<at::BFloat16>();
  const auto* sp = s.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t t = 0; t < T; ++t) {
    const at::BFloat16* ct = cp + t * D;
    const at::BFloat16* st = sp + t * D;
    for (int64_t h = 0; h < H; ++h) {
      const at::BFloat16* xr = xp + t * row_stride + h * D;
      at::BFloat16* orow = op + (t * H + h) * D;
      for (int64_t i = 0; i < half; i += 16) {
        const __mmask16 m = lanes(half - i);
        const __m512 x1 = load_bf16(xr + i, m), x2 = load_bf16(xr + half + i, m);
        // out[i] = x1 cos - x2 sin; out[half + i] = x2 cos + x1 sin (-x2: the sign flipped).
        const __m512 a1 = round_bf16(_mm512_mul_ps(x1, load_bf16(ct + i, m)));
        const __m512 neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x2), sign));
        const __m512 b1 = round_bf16(_mm512_mul_ps(neg, load_bf16(st + i, m)));
        store_bf16(orow + i, _mm512_add_ps(a1, b1), m);
        const __m512 a2 = round_bf16(_mm512_mul_ps(x2, load_bf16(ct + half + i, m)));
        const __m512 b2 = round_bf16(_mm512_mul_ps(x1, load_bf16(st + half + i, m)));
        store_bf16(orow + half + i, _mm512_add_ps(a2, b2), m);
      }
    }
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear", &skinny_linear, "bf16 x @ w.T for a few rows of x, w packed in blocks");
  m.def("amx_ready", &amx_ready, "whether skinny_linear runs calls of up to amx_max_rows on AMX");
  m.attr("amx_max_rows") = kAmxMaxRows;
  m.def("skinny_linear_int8", &skinny_linear_int8,
        "bf16 x @ (int8 w * scale).T, w packed in blocks");
  m.def("skinny_linear_int4", &skinny_linear_int4,
        "bf16 x @ w.T for a few rows of x, w Baton's int4 in blocks");
  pybind11::class_<Projection>(m, "Projection")
      .def(pybind11::init<torch::Tensor, c10::optional<torch::Tensor>, int64_t, int64_t,
                          c10::optional<torch::Tensor>>())
      .def("__call__", &Projection::operator());
  pybind11::class_<DecodeLayer>(m, "DecodeLayer")
      .def(pybind11::init<torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>,
                          c10::optional<torch::Tensor>, Projection, Projection, Projection,
                          Projection, int64_t, int64_t, int64_t, double, double>())
      // Other Python threads (the worker's event loop, the KV link) run meanwhile.
      .def("forward", &DecodeLayer::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("decode_attention", &decode_attention, "query tokens over their paged bf16 KV",
        pybind11::arg("q"), pybind11::arg("k_cache"), pybind11::arg("v_cache"),
        pybind11::arg("tables"), pybind11::arg("rows"), pybind11::arg("base"),
        pybind11::arg("bits"), pybind11::arg("scale"), pybind11::arg("amx") = true);
  m.def("rms_norm", &rms_norm, "Llama's RMSNorm over bf16 rows");
  m.def("rope", &rope, "rotary position embedding, rotate_half convention, bf16");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a bf16 gate_up [T, 2I], as ATen gives it");
  m.def("add_bf16", &add_bf16, "a + b of bf16 tensors, as ATen's add gives it");
  m.def("argmax_rows", &argmax_rows, "torch.argmax(logits, -1) of float32 rows, vectorized");
  m.def("top_logprobs", &top_logprobs, "each row's k largest values as log-softmax, and where");
}
